"""The policeman's rules as a sans-io core, split by concern.

* :mod:`.actions` — the inputs (time, sender) and the actions the core asks of its shell;
* :mod:`.state` — peers, open tasks, leases, and ``change`` (the one way a status moves);
* :mod:`.tasks` — progress, results, failures, validation, retries;
* :mod:`.registry` — READY, reconciliation, heartbeats, departures, the directory;
* :mod:`.assign` — dispatch, undelivered TASKs, the timer tick (leases, liveness, retries);
* :mod:`.submissions` — SUBMIT, the policeman's own tasks, cancel, retry, local tasks;
* :mod:`.recovery` — rebuilding from Postgres after a restart;
* :mod:`.gate` — the authorization hook; :mod:`.core` — the entry points and the handler table.
"""

from casperd.policeman.actions import Now, Sender, SenderKind
from casperd.policeman.core import PolicemanCore

__all__ = ["Now", "PolicemanCore", "Sender", "SenderKind"]
