"""Processes (seed 001): a user's class with ordered, named steps, run one step per job, each
result persisted with the state in one transaction, resumed by step name.

A step attempt is two short calls around the user's code: the first takes the step (the
instance must still be waiting for this very job: see run_seq), the second writes the result,
the journal row and the state, and takes the next step or enqueues a job for it. A worker killed in between
leaves the instance `running` at that step: the job is rescued and runs the same step again.
A finished step never runs again, because finishing it and moving on are one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import re
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg import AsyncConnection
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pgdispatch import sql
from pgdispatch.db.errors import ConfigurationError, PgDispatchError
from pgdispatch.db.masking import mask_document, mask_text
from pgdispatch.worker.batcher import Batcher
from pgdispatch.worker.job import ConnectionSource, Job, job_connections
from pgdispatch.worker.outcome import Discard, Done, Outcome, Postpone

TYPE_FORMAT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
KIND_PREFIX = "process:"
PAYLOAD_LIMIT = 16_384  # bytes of a step's payload kept in the journal

log = logging.getLogger(__name__)


def now() -> datetime:
    """The clock steps are timed and quiet windows checked by (tests replace it)."""
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class StepDone:
    """The step is done: the instance moves to the next step (or is done). `payload` is what
    was sent to an external system (kept in the journal, masked and capped); `state` is merged
    into the instance's state."""

    message: str | None = None
    payload: Any = None
    state: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class StepRetry:
    """Try this step again after `after` seconds (None: the type's backoff), up to the type's
    max_attempts; then the instance is in error."""

    reason: str = ""
    after: float | None = None


@dataclass(frozen=True, slots=True)
class StepError:
    """Stop: the instance waits in `error` until an operator restarts it."""

    message: str


StepResult = StepDone | StepRetry | StepError
StepFunction = Callable[[dict[str, Any]], Awaitable[StepResult | None]]


@dataclass(frozen=True)
class ProcessType:
    key: str  # the type's name in SQL (dispatch.start_process('create_order', ...))
    name: str  # its display name ('CREATE ORDER')
    version: int
    cls: type
    steps: tuple[tuple[str, Any], ...]  # (name, method name or a task class/callable)
    queue: str | None = None
    max_attempts: int = 5
    backoff: float = 60.0  # seconds before the second attempt; doubles each time, up to 1 hour
    step_timeout: float = 300.0  # the seed's bound on a step
    names: tuple[str, ...] = field(init=False)
    following: Mapping[str, str | None] = field(init=False)  # each step's next (None: the last)
    _targets: Mapping[str, Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names = tuple(name for name, _ in self.steps)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "following", dict(zip(names, (*names[1:], None), strict=True)))
        object.__setattr__(self, "_targets", dict(self.steps))
        if not TYPE_FORMAT.match(self.key):
            raise ConfigurationError(f"process type {self.key!r} must match {TYPE_FORMAT.pattern}")
        if self.version < 1 or self.max_attempts < 1 or self.step_timeout <= 0 or self.backoff < 0:
            raise ConfigurationError(f"process {self.key!r}: version and max_attempts must be >= 1, "
                                     "step_timeout > 0, backoff >= 0")
        if not self.steps or len(set(self.names)) != len(self.names):
            raise ConfigurationError(f"process {self.key!r}: steps must be a non-empty list of unique names")
        for name, target in self.steps:
            if isinstance(target, str) and not inspect.iscoroutinefunction(getattr(self.cls, target, None)):
                raise ConfigurationError(f"process {self.key!r}: step {name!r} needs an async method "
                                         f"{self.cls.__name__}.{target}")

    @classmethod
    def of(cls, process_class: type, *, key: str, name: str, version: int, **options: Any) -> ProcessType:
        declared = getattr(process_class, "steps", None)
        if not isinstance(declared, Sequence) or isinstance(declared, str):
            raise ConfigurationError(f"process {key!r}: {process_class.__name__}.steps must list its steps "
                                     "(['validate', ('notify', NotifyTask), ...])")
        steps = tuple((s, s) if isinstance(s, str) else (str(s[0]), s[1]) for s in declared)
        return cls(key, name, version, process_class, steps, **options)

    @property
    def kind(self) -> str:
        return KIND_PREFIX + self.key

    def step_function(self, name: str) -> StepFunction:
        target = self._targets[name]
        if isinstance(target, str):
            function: StepFunction = getattr(self.cls(), target)
            return function
        task: StepFunction = target() if inspect.isclass(target) else target  # type: ignore[assignment]
        return task

    def delay(self, attempt: int, after: float | None) -> float:
        if after is not None:
            return max(0.0, after)
        return float(min(3600.0, self.backoff * 2 ** max(0, attempt - 1)))


@dataclass(frozen=True, slots=True)
class _Take:
    """A step job asking for its instance's step, as take_process_steps_v3 takes it."""

    process_id: int
    run_seq: int
    job_id: int
    token: UUID  # the job's lease: only its current holder takes (and finishes) the step


@dataclass(frozen=True, slots=True)
class _Finish:
    """One step attempt's result, as finish_process_steps_v3 takes it."""

    process_id: int
    run_seq: int
    job_id: int
    token: UUID
    step: str
    attempt: int
    started_at: datetime
    result: str
    message: str | None = None
    payload: Jsonb | None = None
    state: Jsonb | None = None
    next_step: str | None = None
    delay: float | None = None
    error: str | None = None
    continue_here: bool = False


class ProcessRunner:
    """The executor of kind process:<type>. It runs the instance's current step and, while the
    instance goes on without waiting, its next steps too, in the same job (a claim per step
    would cost more than a no-op step): up to STEPS_PER_JOB steps or JOB_SECONDS, then the next
    step is left to a job of its own, so one long instance never holds a slot for long.

    The steps of all the instances a worker runs at once are taken and finished in batches
    (one call for the lot, see Batcher); finishing a step takes the next in the same call."""

    STEPS_PER_JOB = 50
    JOB_SECONDS = 30.0

    def __init__(self, ptype: ProcessType) -> None:
        self.ptype = ptype
        self._calls: weakref.WeakKeyDictionary[ConnectionSource, _StepCalls] = weakref.WeakKeyDictionary()

    async def __call__(self, job: Job) -> Outcome:
        process_id, run_seq = job.args.get("process_id"), job.args.get("run_seq")
        if not isinstance(process_id, int) or not isinstance(run_seq, int):
            return Discard("invalid", f"a process job needs integer process_id and run_seq, got {job.args!r}")
        written = job.args.get("version")
        if isinstance(written, int) and written > self.ptype.version:
            # Written by a newer version of the type (a rolling deploy, a rollback): its step may
            # be one this version does not have. Left for a newer worker, as jobs of a newer build.
            return Postpone(60.0, f"process {process_id}: its step was written by {self.ptype.key} version "
                                  f"{written}; this worker runs version {self.ptype.version}")
        calls = self._calls_for(job)
        taken = await calls.take.ask(_Take(process_id, run_seq, job.id, job.lease_token))
        if taken["outcome"] in ("newer", "quiet"):
            return Postpone(taken["wait_seconds"], taken["detail"])
        if taken["outcome"] != "take":  # skip (moved on, or not our lease) or missing (now in error)
            return Done(detail={"process_id": process_id, "outcome": taken["outcome"]})
        step, attempt, state = taken["step"], taken["attempt"], taken["state"]
        started_job = now()
        for ran in range(1, self.STEPS_PER_JOB + 1):
            started = now()
            result = await self._run(step, state)
            last = ran == self.STEPS_PER_JOB or (now() - started_job).total_seconds() > self.JOB_SECONDS
            finished = await self._store(calls, self._finish(
                job, process_id, run_seq, step, attempt, started, result, continue_here=not last))
            if finished["status"] == "late":
                log.warning("process %s: the finish of step %s (attempt %d) came late and was not applied: "
                            "the instance had moved on (journaled as 'late')", process_id, step, attempt)
            if finished["status"] != "running":
                return Done(detail={"process_id": process_id, "steps": ran, "status": finished["status"]})
            step, attempt, state = finished["step"], finished["attempt"], finished["state"]
        raise AssertionError("unreachable: the last step of a job never continues")  # pragma: no cover

    async def _store(self, calls: _StepCalls, finish: _Finish) -> dict[str, Any]:
        """Finish the step; a result the database refuses (a NUL character in a state, say) puts
        the instance in error with the reason, instead of failing its job again and again."""
        try:
            return await calls.finish.ask(finish)
        except psycopg.Error as exc:
            if not _bad_data(exc):
                raise
            return await calls.finish.ask(_Finish(
                finish.process_id, finish.run_seq, finish.job_id, finish.token, finish.step, finish.attempt,
                finish.started_at, "error",
                error=f"step {finish.step}: its result could not be stored: {type(exc).__name__}: {exc}"))

    def _calls_for(self, job: Job) -> _StepCalls:
        source = job_connections.get()
        if source is None:
            raise PgDispatchError("a process runs on a pgdispatch.App (worker --app or App.drain)")
        calls = self._calls.get(source)
        if calls is None:
            calls = self._calls[source] = _StepCalls(self.ptype, source)
        return calls

    async def _run(self, step: str, state: dict[str, Any]) -> StepResult:
        try:
            async with asyncio.timeout(self.ptype.step_timeout):
                result = await self.ptype.step_function(step)(dict(state))
        except TimeoutError:
            return StepRetry(f"step {step} ran past {self.ptype.step_timeout:g}s")
        except Exception as exc:  # the user's step: a retry with the error, as for jobs
            return StepRetry(f"{type(exc).__name__}: {exc}")
        if result is None:
            return StepDone()
        if not isinstance(result, StepDone | StepRetry | StepError):
            return StepRetry(f"step {step} returned {result!r}, not a StepDone/StepRetry/StepError")
        return result

    def _finish(self, job: Job, process_id: int, run_seq: int, step: str, attempt: int, started: datetime,
                result: StepResult, *, continue_here: bool) -> _Finish:
        at = (process_id, run_seq, job.id, job.lease_token, step, attempt, started)
        if isinstance(result, StepDone):
            return _Finish(*at, "done", message=result.message, payload=_payload(result.payload),
                           state=Jsonb(dict(result.state or {})), next_step=self.ptype.following[step],
                           continue_here=continue_here)
        if isinstance(result, StepRetry) and attempt < self.ptype.max_attempts:
            return _Finish(*at, "retry", error=result.reason, delay=self.ptype.delay(attempt, result.after))
        error = result.message if isinstance(result, StepError) else (
            f"{result.reason} (attempt {attempt} of {self.ptype.max_attempts})")
        return _Finish(*at, "error", error=error)


class _StepCalls:
    """The two batched calls of one process type on one connection source (a worker's pool,
    or an inline drain's connection)."""

    def __init__(self, ptype: ProcessType, source: ConnectionSource) -> None:
        self.ptype, self.source = ptype, source
        self.take: Batcher[_Take, dict[str, Any]] = Batcher(self._take, alone_after=_bad_data)
        self.finish: Batcher[_Finish, dict[str, Any]] = Batcher(self._finish, alone_after=_bad_data)

    async def _take(self, requests: Sequence[_Take]) -> list[dict[str, Any]]:
        rows = await self._rows("take_process_steps", {
            "ids": [r.process_id for r in requests], "run_seqs": [r.run_seq for r in requests],
            "job_ids": [r.job_id for r in requests], "tokens": [r.token for r in requests],
            "version": self.ptype.version, "steps": list(self.ptype.names), "at": now()})
        return _answers([(r.process_id, r.run_seq) for r in requests], rows, {"outcome": "skip"})

    async def _finish(self, requests: Sequence[_Finish]) -> list[dict[str, Any]]:
        columns = {name: [getattr(r, name) for r in requests] for name in _Finish.__slots__}
        rows = await self._rows("finish_process_steps", {
            "ids": columns["process_id"], "run_seqs": columns["run_seq"], "job_ids": columns["job_id"],
            "tokens": columns["token"], "steps": columns["step"],
            "attempts": columns["attempt"], "version": self.ptype.version,
            "started_ats": columns["started_at"], "results": columns["result"],
            "messages": columns["message"], "payloads": columns["payload"], "states": columns["state"],
            "next_steps": columns["next_step"], "delays": columns["delay"], "errors": columns["error"],
            "continue_here": columns["continue_here"], "at": now()})
        late = {(row["process_id"], row["step"], row["attempt"]) for row in rows if row["status"] == "late"}
        return [{"status": "late"} if (r.process_id, r.step, r.attempt) in late else answer
                for r, answer in zip(requests, _answers([(r.process_id, r.run_seq) for r in requests],
                                                        rows, {"status": "skip"}), strict=True)]

    async def _rows(self, query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        async with self.source() as conn, _single_statements(conn):
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(sql.query(query), params)
            return await cur.fetchall()


def _answers(requests: Sequence[tuple[int, int]], rows: list[dict[str, Any]],
             absent: dict[str, Any]) -> list[dict[str, Any]]:
    """Each request's row, by (process_id, run_seq); an instance the call left alone (it moved
    on meanwhile) has none."""
    by_key = {(row["process_id"], row["run_seq"]): row for row in rows}
    return [by_key.get(key, absent) for key in requests]


def _bad_data(error: Exception) -> bool:
    """A batch that failed on its data (not on its connection): worth sending one by one."""
    return isinstance(error, psycopg.Error) and not isinstance(error, psycopg.OperationalError)


@contextlib.asynccontextmanager
async def _single_statements(conn: AsyncConnection[Any]) -> AsyncIterator[None]:
    """Each call is one function (atomic by itself): on an idle pooled connection, run it
    without BEGIN and COMMIT around it, a third of the round trips; inside a transaction (the
    inline drain's savepoint), as it is."""
    if conn.info.transaction_status != TransactionStatus.IDLE or conn.autocommit:
        yield
        return
    await conn.set_autocommit(True)
    try:
        yield
    finally:
        await conn.set_autocommit(False)


def _payload(payload: Any) -> Jsonb | None:
    """What the journal keeps of a step's payload: masked first, then cut (an excerpt is text,
    which no key-based masking can see into afterwards)."""
    if payload is None:
        return None
    masked = mask_document(json.loads(json.dumps(payload, default=str)))
    text = json.dumps(masked)
    if len(text.encode()) > PAYLOAD_LIMIT:
        return Jsonb({"truncated": True, "excerpt": mask_text(text[:PAYLOAD_LIMIT])})
    return Jsonb(masked if isinstance(masked, dict | list) else {"value": masked})
