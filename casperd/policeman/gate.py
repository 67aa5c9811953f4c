"""The one authorization point of the policeman core (issue #9, protocol/SPEC.md "Trust").

:class:`~casperd.policeman.PolicemanCore` calls its ``authorize`` hook for every message, before any
handler runs: ``authorize(role, command, service=..., task_type=...)`` raises a CasperError (wire
code ``forbidden``) to refuse. The hook is a constructor argument, by default
:func:`casperd.authz.authorize` (the one role table); tests may pass another. Identity binding
(a frame's Curve key against its enrollment) runs just before it, in ``PolicemanCore.check_key``.
"""

from __future__ import annotations

from typing import Protocol

from casperd.messages import Command


class Authorizer(Protocol):
    def __call__(
        self, role: str, command: Command, *, service: str | None = None, task_type: str | None = None
    ) -> None:
        """Return to allow; raise a CasperError (code ``forbidden``) to refuse."""
