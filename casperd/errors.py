"""The one error hierarchy of CASPER.

Every error a user or a peer can see is a :class:`CasperError`. Each class carries a stable
``code`` (sent on the wire in ERROR frames and printed by ``caspectl``) and every instance names
its cause (``message``) and, where one exists, the fix (``hint``). Messages never contain secret
values: callers pass names of secrets, never their contents.
"""

from __future__ import annotations

from typing import Any, ClassVar


class CasperError(Exception):
    """Root of every CASPER error."""

    code: ClassVar[str] = "internal"
    retryable: ClassVar[bool] = True
    """Whether running the same task again could succeed (workers report it in FAILED)."""

    def __init__(self, message: str, *, hint: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def to_wire(self) -> dict[str, Any]:
        """The body of an ERROR frame or a failed REPLY."""
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.hint:
            out["hint"] = self.hint
        return out


# --- protocol (wire) errors: the peer sent something we cannot accept --------------------------
class ProtocolError(CasperError):
    code = "protocol"


class DecodeError(ProtocolError):
    """Bytes that are not a CASPER message. Carries the size of the raw data, never the data."""

    code = "decode"


class VersionError(ProtocolError):
    code = "version"


class UnknownCommandError(ProtocolError):
    code = "unknown-command"


class InvalidBodyError(ProtocolError):
    code = "invalid-body"


class OversizeError(ProtocolError):
    code = "oversize"


class IdentityError(ProtocolError):
    code = "identity"


class ForbiddenError(ProtocolError):
    """The sender's enrolled role may not do this (protocol/SPEC.md, "Trust")."""

    code = "forbidden"
    retryable = False


class OverloadedError(ProtocolError):
    """A quota is reached; the sender should wait ``retry_after_s`` and try again."""

    code = "overloaded"

    def __init__(self, message: str, *, hint: str | None = None, retry_after_s: float = 1.0, **details: Any) -> None:
        super().__init__(message, hint=hint, **details)
        self.retry_after_s = retry_after_s

    def to_wire(self) -> dict[str, Any]:
        out = super().to_wire()
        out["retry_after_s"] = self.retry_after_s
        return out


class UnsupportedError(ProtocolError):
    """A valid message sent to a socket or node that does not serve it."""

    code = "unsupported"


class UnknownPeerError(ProtocolError):
    code = "unknown-peer"


# --- task / lifecycle errors ------------------------------------------------------------------
class TaskError(CasperError):
    code = "task"


class IllegalTransitionError(TaskError):
    code = "illegal-transition"


class NotFoundError(CasperError):
    """The thing a request names does not exist (a task, a peer, a job)."""

    code = "not-found"


class TaskNotFoundError(NotFoundError, TaskError):
    code = "not-found"


class PeerNotFoundError(NotFoundError):
    """No registered peer has the name a request gives (``drain``, ``resume``)."""

    code = "not-found"


class UnknownTaskTypeError(TaskError):
    code = "unknown-task-type"


class BadInputError(TaskError):
    """A task's input does not fit its type's schema: refused at SUBMIT, never run or retried."""

    code = "bad-input"
    retryable = False


class IdempotencyConflictError(TaskError):
    """An idempotency key reused with a different task: refused, as payment APIs do."""

    code = "idempotency-conflict"
    retryable = False


class ShellExitError(TaskError):
    """A shell command exited with a code its task did not expect (see input.expect_exit)."""

    code = "exit-code"


class TaskTimeoutError(TaskError):
    code = "timeout"


class TaskCancelledError(TaskError):
    code = "cancelled"


class TaskCrashError(TaskError):
    """The handler raised an exception that is not a CasperError (a bug; retryable)."""

    code = "crash"


class OutputTooLargeError(TaskError):
    """An outcome (or, on the broker, an assignment) that does not fit in one message."""

    code = "too-large"
    retryable = False


class InvalidOutputError(TaskError):
    """A RESULT output that is not storable JSON."""

    code = "invalid-output"
    retryable = False


class ValidationFailedError(TaskError):
    """The task type's validator rejected the output (the policeman's ``validating`` state)."""

    code = "validation"


class HolderLostError(TaskError):
    """The worker holding the task was lost, or its lease expired, and no attempts were left."""

    code = "holder-lost"
    retryable = False


class DrainingError(TaskError):
    """An assignment reached a worker that is draining: it goes back to pending, attempt refunded."""

    code = "draining"


class HandedBackError(TaskError):
    """A worker stopped before finishing a task it held: back to pending, attempt refunded."""

    code = "handed-back"


# --- agents (Claude-backed work) ---------------------------------------------------------------
class AgentError(TaskError):
    code = "agent"


class MissingApiKeyError(AgentError):
    """No Anthropic API key configured: Claude-backed work fails at once, never retried."""

    code = "no-api-key"
    retryable = False


class ModelRefusalError(AgentError):
    """The model declined the task (``stop_reason: refusal``): the same conversation would be refused again."""

    code = "refusal"
    retryable = False


class LlmError(AgentError):
    """The model API failed after CASPER's retries, or its circuit breaker is open (retryable later)."""

    code = "llm"


class LlmRequestError(AgentError):
    """The API refused the request itself (HTTP 400/401/403/404/413): running it again cannot help."""

    code = "llm-request"
    retryable = False


class BudgetExceededError(AgentError):
    """A task's or job's limit (turns, tokens, cost, wall time) is spent."""

    code = "budget"
    retryable = False


class SandboxError(AgentError):
    """A tool call tried to leave its worktree or broke a sandbox rule."""

    code = "sandbox"
    retryable = False


class PatchConflictError(AgentError):
    """A patch does not apply to the tree it was meant for."""

    code = "conflict"


class GitError(AgentError):
    code = "git"


# --- adapters ---------------------------------------------------------------------------------
class StorageError(CasperError):
    code = "storage"


class StorageRejectedError(StorageError):
    """Postgres refused the rows of one task (a value it cannot store); the other tasks committed."""

    code = "storage-rejected"
    retryable = False


class MigrationError(StorageError):
    code = "migration"


class CacheError(CasperError):
    code = "cache"


class ConfigError(CasperError):
    code = "config"


class EmbeddedServiceError(CasperError):
    code = "embedded-service"


class SpawnError(CasperError):
    """A spawner could not start or remove a peer (the Docker engine, the swarm, casperd up)."""

    code = "spawn"


# --- admin client -----------------------------------------------------------------------------
class CommandError(CasperError):
    code = "command"


class NoDaemonError(CommandError):
    code = "no-daemon"


class NoDefaultError(NoDaemonError):
    code = "no-mesh"


class RequestTimeoutError(CommandError):
    code = "request-timeout"


_BY_CODE: dict[str, type[CasperError]] = {}


def _index(cls: type[CasperError]) -> None:
    # A code shared by several classes maps to the first indexed: not-found to TaskNotFoundError,
    # as clients have always received it (a PeerNotFoundError is a NotFoundError on the wire too).
    _BY_CODE.setdefault(cls.code, cls)
    for sub in cls.__subclasses__():
        _index(sub)


_index(CasperError)


def from_wire(body: dict[str, Any]) -> CasperError:
    """Rebuild an error received in an ERROR frame or a failed REPLY."""
    cls = _BY_CODE.get(str(body.get("code", "")), CasperError)
    err = cls(str(body.get("message", "unknown error")), hint=body.get("hint"))
    return err
