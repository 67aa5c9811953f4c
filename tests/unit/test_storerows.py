"""The group commit's hand-built JSON rows parse back to the record's values (casperd.storerows)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from casperd.messages import TaskSpec, new_task_id
from casperd.storerows import commit_params
from casperd.taskrecord import TaskEvent, TaskRecord

NOW = datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=UTC)


def test_rows_parse_back_with_awkward_text_and_repeated_values() -> None:
    plain = TaskRecord.from_spec(new_task_id(), TaskSpec(type="noop"), 3, None)
    odd = TaskRecord.from_spec(
        new_task_id(),
        TaskSpec(type="shell", input={"q": 'a"b\\c é'}, requires=("y", "x"), affinity='k"1', timeout_s=2),
        3,
        'sub"mitter',
    )
    odd.persisted, odd.assigned_to, odd.error_json = True, 'dev"1', '[{"code":"x"}]'
    events = [
        TaskEvent(NOW, plain.id, None, "pending", None, 0),
        TaskEvent(NOW, odd.id, "pending", "assigned", 'dev"1', 1, '{"k":1}'),
    ]
    for _ in range(2):  # the second time from the encoders' caches
        new, upd, keys, ev = (json.loads(p) for p in commit_params([plain, odd], events, [("k\u00fc", plain.id, NOW)]))
        assert [r["id"] for r in new] == [str(plain.id)] and new[0]["type"] == "noop"
        assert new[0]["submitted_by"] is None and new[0]["timeout_s"] is None and new[0]["requires"] == []
        assert [r["id"] for r in upd] == [str(odd.id)] and upd[0]["assigned_to"] == 'dev"1'
        assert upd[0]["error"] == [{"code": "x"}]
        assert keys == [{"key": "k\u00fc", "task_id": str(plain.id), "created_at": NOW.isoformat()}]
        assert [(e["task_id"], e["from_status"], e["peer"], e["detail"]) for e in ev] == [
            (str(plain.id), None, None, None),
            (str(odd.id), "pending", 'dev"1', {"k": 1}),
        ]
    spec_rec = TaskRecord.from_spec(new_task_id(), TaskSpec(type="shell", requires=("y", "x"), timeout_s=2), 3, "s")
    (row,) = json.loads(commit_params([spec_rec], [], [])[0])
    assert row["requires"] == ["x", "y"] and row["timeout_s"] == 2.0 and row["submitted_by"] == "s"
