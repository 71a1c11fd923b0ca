"""Every error the orchestrator raises, under one root.

The branch says who should act: ``SubmitError`` is the caller's to fix, ``JobError`` reports a
job's outcome, ``TaskError`` is raised by job kinds inside a worker and its type says whether the
runtime retries (``TransientError``) or fails the job at once (``PermanentError``).
"""

from __future__ import annotations

from typing import Any


def _rebuild(cls: type[OrchestratorError], args: tuple[Any, ...], state: dict[str, Any]
             ) -> OrchestratorError:
    error = cls.__new__(cls)
    BaseException.__init__(error, *args)
    error.__dict__.update(state)
    return error


class OrchestratorError(Exception):
    """Root of every error raised by this package."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Subclasses take their own arguments (a job id, a tier, ...) and build the message:
        # rebuild from the message and the attributes, so that an error crosses a process
        # boundary (multiprocessing, concurrent.futures) as itself.
        return _rebuild, (type(self), self.args, dict(self.__dict__))


class ConfigurationError(OrchestratorError):
    """Raised when settings from the environment are missing, malformed or contradictory."""


class ServiceUnavailable(OrchestratorError):
    """Raised when the database or the broker cannot be reached.

    ``job_id`` names a job that was stored all the same (a submit with an idempotency key
    whose publish failed): it is sent once the broker answers, and submitting again with the
    same key returns it.
    """

    def __init__(self, message: str, *, job_id: str | None = None) -> None:
        self.job_id = job_id
        super().__init__(message)


# --- submit side -----------------------------------------------------------------------------


class SubmitError(OrchestratorError):
    """Raised when a submit is refused; nothing was stored and nothing was enqueued."""


class UnknownKind(SubmitError):
    """Raised when a job kind is not declared in any module listed in ``ORCH_IMPORTS``."""

    def __init__(self, kind: str, known: list[str]) -> None:
        self.kind = kind
        self.known = known
        super().__init__(
            f"unknown job kind {kind!r}; declared kinds: {', '.join(sorted(known)) or 'none'} "
            "(declare it with @kind in a module listed in ORCH_IMPORTS)"
        )


class InvalidPayload(SubmitError):
    """Raised when a payload does not match its kind's schema; ``errors`` lists each field."""

    def __init__(self, kind: str, errors: list[dict[str, Any]]) -> None:
        self.kind = kind
        self.errors = errors
        lines = [
            f"{'.'.join(str(p) for p in err.get('loc', ())) or '<payload>'}: {err.get('msg')}"
            for err in errors
        ]
        super().__init__(f"invalid payload for kind {kind!r}: " + "; ".join(lines))


class SubmitInProgress(SubmitError):
    """Raised when another submit with the same idempotency key is still under way (a bulk
    job whose items are still streaming in): try again once it has finished."""

    def __init__(self, job_id: str, detail: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id} with this idempotency key is still being submitted: "
                         f"{detail}")


class InvalidOption(SubmitError):
    """Raised when a submit option (tier, tenant, idempotency key, deadline) is malformed."""


class Overloaded(SubmitError):
    """Raised when a tier sheds load: its estimated queue wait exceeds its objective, or its
    backlog has reached ``max_backlog`` or ``hard_backlog``.

    ``retry_after`` is the number of seconds after which the backlog should have drained
    enough to accept the job; ``reason`` names the bound that refused it.
    """

    def __init__(self, tier: str, *, reason: str, retry_after: float, detail: str) -> None:
        self.tier = tier
        self.reason = reason
        self.retry_after = retry_after
        super().__init__(f"{tier} tier is overloaded: {detail}; retry after {retry_after:g}s")


class QuotaExceeded(SubmitError):
    """Raised when a tenant's quota refuses a submit; ``quota`` names which one.

    ``quota`` is ``max_inflight`` (jobs queued or running in ``tier``), ``rate`` (submissions
    per second) or ``monthly_budget`` (cost this calendar month). ``retry_after`` is seconds
    until the quota frees up, or None when that depends on the tenant's own jobs finishing.
    """

    def __init__(self, tenant: str, *, quota: str, limit: Any, retry_after: float | None,
                 current: Any = None, tier: str | None = None, detail: str | None = None
                 ) -> None:
        self.tenant = tenant
        self.quota = quota
        self.limit = limit
        self.retry_after = retry_after
        self.current = current
        self.tier = tier
        scope = f" in the {tier} tier" if tier else ""
        what = detail or f"limit {limit}" + ("" if current is None else f", now {current}")
        retry = "" if retry_after is None else f"; retry after {retry_after:g}s"
        super().__init__(f"tenant {tenant!r} is over its {quota} quota{scope}: {what}{retry}")


class RetrievalError(SubmitError):
    """Raised when an ``index``, ``search`` or ``evaluate`` request names an index, a source
    or a vector that cannot serve it. At submit nothing is stored; raised inside a worker it
    fails the job at once (the same input can never succeed)."""


class UnknownIndex(RetrievalError):
    """Raised when no index has been built under the given name (or the name is malformed)."""

    def __init__(self, name: str, detail: str) -> None:
        self.name = name
        super().__init__(f"unknown index {name!r}: {detail}")


class DimensionMismatch(RetrievalError):
    """Raised when vectors (a query, or a source being indexed) are not the index's width."""

    def __init__(self, name: str, expected: int, got: int) -> None:
        self.name = name
        self.expected = expected
        self.got = got
        super().__init__(f"index {name!r} holds {expected}-dimensional vectors, got {got}")


class InvalidSource(RetrievalError):
    """Raised when an index source is not a finished ``embed`` job with vectors: unknown,
    another kind, not succeeded yet, empty, embedded with another model than the index's, or
    given ids that do not match its vectors."""

    def __init__(self, job_id: str, detail: str) -> None:
        self.job_id = job_id
        super().__init__(f"index source {job_id}: {detail}")


# --- job outcomes ----------------------------------------------------------------------------


class JobError(OrchestratorError):
    """Raised when a job cannot give the result that was asked for."""

    def __init__(self, job_id: str, message: str) -> None:
        self.job_id = job_id
        super().__init__(message)


class JobNotFound(JobError):
    """Raised when no job has the given id."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id, f"no job with id {job_id!r}")


class JobFailed(JobError):
    """Raised when a job ended ``failed`` or ``dead``; ``error`` is the worker's last error."""

    def __init__(self, job_id: str, state: str, error: str | None) -> None:
        self.state = state
        self.error = error
        super().__init__(job_id, f"job {job_id} is {state}: {error or 'no error recorded'}")


class JobCancelled(JobError):
    """Raised when asking for the result of a cancelled job."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id, f"job {job_id} was cancelled")


class JobTimeout(JobError, TimeoutError):
    """Raised when a job did not finish within the time the caller was willing to wait."""

    def __init__(self, job_id: str, timeout: float, state: str) -> None:
        self.timeout = timeout
        self.state = state
        super().__init__(job_id, f"job {job_id} still {state} after waiting {timeout:g}s")


# --- raised by job kinds inside a worker -----------------------------------------------------


class TaskError(OrchestratorError):
    """Raised by a job kind; the subclass decides whether the runtime retries."""


class TransientError(TaskError):
    """Raised when an execution failed for a reason that may pass (retried with backoff)."""


class PermanentError(TaskError):
    """Raised when an execution can never succeed with this payload (failed, no retry)."""


# --- windows and schedules -------------------------------------------------------------------


class UnknownWindow(InvalidOption):
    """Raised when a submit, a schedule or a command names a window that nothing defines.

    Windows come from ``orchestrator windows add``, the config file's ``[windows.NAME]``
    tables, and the built-in ``offpeak``.
    """

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        super().__init__(
            f"unknown window {name!r}; defined windows: {', '.join(sorted(known)) or 'none'} "
            "(define it with `orchestrator windows add` or in the config file's [windows] "
            "section, or submit with window=None to run now)"
        )


class DefinitionError(OrchestratorError):
    """Raised when an operator's definition of a window or schedule is refused.

    Nothing was written: the database and the config file are as they were.
    """


class InvalidWindow(DefinitionError):
    """Raised when a window's cron, timezone, duration, dates, tiers, kinds, slots or price
    multiplier is malformed or contradictory."""


class InvalidSchedule(DefinitionError):
    """Raised when a recurring schedule's cron, timezone, kind, payload, tier, tenant or window
    is malformed."""


class AlreadyDefined(DefinitionError):
    """Raised when adding a window or schedule whose name is already taken."""


class NotDefined(DefinitionError):
    """Raised when removing or showing a window or schedule that does not exist (or that only
    the config file or the built-ins define, which the CLI cannot remove)."""


class WindowInUse(DefinitionError):
    """Raised when removing a window that deferred, queued or running jobs still name."""
