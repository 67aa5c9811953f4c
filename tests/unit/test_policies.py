"""Per task type retry and timeout policies."""

from __future__ import annotations

from typing import Any

import pytest

from casperd.errors import ConfigError
from casperd.handlers import Catalog
from casperd.messages import TaskSpec
from casperd.metrics import Metrics
from casperd.policeman import PolicemanCore
from casperd.settings import load_settings
from casperd.taskrecord import utcnow


def broker(**overrides: Any) -> PolicemanCore:
    return PolicemanCore(load_settings({"role": "policeman", **overrides}), Catalog(), Metrics(), 0.0)


def test_type_policy_overrides_the_mesh_defaults_field_by_field() -> None:
    b = broker(max_attempts=3, backoff_base_s=1.0, task_policies={"shell": {"max_attempts": 5, "backoff_cap_s": 4}})
    shell, echo = b.policy_for("shell"), b.policy_for("echo")
    assert (shell.max_attempts, shell.base_s, shell.factor, shell.cap_s) == (5, 1.0, 2.0, 4.0)
    assert [shell.backoff(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 4.0]
    assert echo is b.policy, "types without a policy use the mesh defaults"


def test_new_tasks_take_their_types_attempts_and_timeout() -> None:
    b = broker(task_policies='{"shell": {"max_attempts": 7, "timeout_s": 30}}')
    rec = b.create(TaskSpec(type="shell", input={"cmd": "true"}), "t", utcnow())
    assert (rec.max_attempts, rec.timeout_s) == (7, 30.0)
    own = b.create(TaskSpec(type="shell", input={"cmd": "true"}, max_attempts=2, timeout_s=5), "t", utcnow())
    assert (own.max_attempts, own.timeout_s) == (2, 5.0), "the task's own values win"
    echo = b.create(TaskSpec(type="echo"), "t", utcnow())
    assert (echo.max_attempts, echo.timeout_s) == (3, None)


def test_bad_policies_are_configuration_errors() -> None:
    with pytest.raises(ConfigError, match="task_policies"):
        load_settings({"task_policies": "{not json"})
    with pytest.raises(ConfigError, match="task_policies"):
        load_settings({"task_policies": {"shell": {"max_attempts": 0}}})
    with pytest.raises(ConfigError, match="task_policies"):
        load_settings({"task_policies": {"shell": {"retries": 2}}})
