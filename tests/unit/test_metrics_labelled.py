"""metrics.Labelled: one child per label values, the same series labels() would give."""

from __future__ import annotations

from casperd.metrics import Metrics


def test_labelled_children_are_made_once_and_count_in_the_metric() -> None:
    m = Metrics()
    a = m.messages_by("SUBMIT", "in")
    assert m.messages_by("SUBMIT", "in") is a
    a.inc()
    m.messages_by("RESULT", "in").inc(2)
    assert m.registry.get_sample_value("casper_messages_total", {"command": "SUBMIT", "direction": "in"}) == 1
    assert m.registry.get_sample_value("casper_messages_total", {"command": "RESULT", "direction": "in"}) == 2
    m.task_completion_by("complete").observe(0.5)
    assert m.registry.get_sample_value("casper_task_completion_seconds_count", {"status": "complete"}) == 1
