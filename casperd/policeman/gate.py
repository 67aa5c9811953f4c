"""The one authorization point of the policeman core (issue #9, protocol/SPEC.md "Trust").

:class:`~casperd.policeman.PolicemanCore` calls its ``authorize`` hook for every message, before any
handler runs: ``authorize(role, command, service=..., task_type=...)`` raises a CasperError (wire
code ``forbidden``) to refuse. The hook is a constructor argument; the default below allows
everything and exists only until the trust work's ``casperd.authz.authorize`` is wired in here.
"""

from __future__ import annotations

from typing import Protocol

from casperd.messages import Command


class Authorizer(Protocol):
    def __call__(
        self, role: str, command: Command, *, service: str | None = None, task_type: str | None = None
    ) -> None:
        """Return to allow; raise a CasperError (code ``forbidden``) to refuse."""


def allow_all_until_authz(
    role: str, command: Command, *, service: str | None = None, task_type: str | None = None
) -> None:
    """Pass-through: allows every command (today's behaviour) until casperd.authz lands (issue #9)."""
