"""Named exit codes shared by casperd and caspectl."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1  # the operation failed (the message says why)
    USAGE = 2  # bad flags, bad input, bad configuration
    UNAVAILABLE = 3  # no daemon at the control address, or a dependency is down
    NOT_FOUND = 4  # no such task or peer
    TASK_FAILED = 5  # --wait: the task ended dead or cancelled
    TIMEOUT = 6  # no answer in time
    UNHEALTHY = 7  # caspectl health: a check failed
