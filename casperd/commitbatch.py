"""The changes staged for one group commit (:class:`Batch`): task rows, events, idempotency keys,
and what waits for their commit. :mod:`casperd.groupcommit` swaps in a fresh batch as it starts a
commit, splits one by task to isolate a row Postgres refuses, and puts a failed one back in front
of newer changes."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from casperd.taskrecord import TaskEvent, TaskRecord


@dataclass(slots=True)
class Batch:
    dirty: dict[uuid.UUID, TaskRecord] = field(default_factory=dict)
    events: list[TaskEvent] = field(default_factory=list)
    keys: list[tuple[str, uuid.UUID, Any]] = field(default_factory=list)
    first: list[Callable[[], None]] = field(default_factory=list)
    """Callbacks that run before ``after`` once the batch commits (TASKs to workers: the work starts
    before the submitters hear ACCEPTED)."""
    after: list[Callable[[], None]] = field(default_factory=list)
    refused: list[TaskRecord] = field(default_factory=list)
    """Records whose rows Postgres refused while writing this batch (handed to ``on_reject``
    once the rest of the batch is committed and its callbacks have run)."""
    groups: dict[str, tuple[Callable[[list[Any]], None], list[Any]]] = field(default_factory=dict)
    """key -> (callback, items): one call per batch with every item given under the key, after
    ``after`` (e.g. the tasks a batch finished, for the finish listeners)."""
    resent: bool = False
    """Re-sent after a failure that may have hidden a commit: its new tasks' rows may exist already,
    and are written as upserts (storerows.commit_sql)."""

    def __bool__(self) -> bool:
        return bool(self.has_rows() or self.first or self.after or self.refused or self.groups)

    def has_rows(self) -> bool:
        """Whether it writes anything (else it holds only what waits for the commits before it)."""
        return bool(self.dirty or self.events or self.keys)

    def task_ids(self) -> list[uuid.UUID]:
        """Every task this batch writes a row for, in first-staged order."""
        seen = dict.fromkeys(self.dirty)
        seen.update(dict.fromkeys(e.task_id for e in self.events))
        seen.update(dict.fromkeys(t for _, t, _ in self.keys))
        return list(seen)

    def subset(self, ids: list[uuid.UUID]) -> Batch:
        """The rows of these tasks only (no callbacks)."""
        want = set(ids)
        return Batch(
            {t: r for t, r in self.dirty.items() if t in want},
            [e for e in self.events if e.task_id in want],
            [k for k in self.keys if k[1] in want],
            resent=self.resent,
        )

    def absorb(self, newer: Batch) -> None:
        """Put ``newer`` behind this batch (a failed batch goes back in front of newer changes)."""
        self.dirty.update(newer.dirty)
        self.events.extend(newer.events)
        self.keys.extend(newer.keys)
        self.first.extend(newer.first)
        self.after.extend(newer.after)
        self.refused.extend(newer.refused)
        for key, (fn, items) in newer.groups.items():
            if key in self.groups:
                self.groups[key][1].extend(items)
            else:
                self.groups[key] = (fn, items)
