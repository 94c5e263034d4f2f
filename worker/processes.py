"""Processes (seed 001): a user's class with ordered, named steps, run one step per job, each
result persisted with the state in one transaction, resumed by step name.

A step attempt is two short transactions around the user's code: the first takes the step
(the instance must still be waiting for this very job: see run_seq), the second writes the
result, the journal row and the state, and enqueues the next step. A worker killed in between
leaves the instance `running` at that step: the job is rescued and runs the same step again.
A finished step never runs again, because finishing it and moving on are one transaction.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pgdispatch import sql
from pgdispatch.db.errors import ConfigurationError
from pgdispatch.worker.job import Job
from pgdispatch.worker.outcome import Done, Outcome, Postpone

TYPE_FORMAT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
KIND_PREFIX = "process:"
PAYLOAD_LIMIT = 16_384  # bytes of a step's payload kept in the journal


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

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(name for name, _ in self.steps))
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
        target = dict(self.steps)[name]
        if isinstance(target, str):
            function: StepFunction = getattr(self.cls(), target)
            return function
        task: StepFunction = target() if inspect.isclass(target) else target  # type: ignore[assignment]
        return task

    def delay(self, attempt: int, after: float | None) -> float:
        if after is not None:
            return max(0.0, after)
        return float(min(3600.0, self.backoff * 2 ** max(0, attempt - 1)))


class ProcessRunner:
    """The executor of kind process:<type>: one step of one instance per job."""

    def __init__(self, ptype: ProcessType) -> None:
        self.ptype = ptype

    async def __call__(self, job: Job) -> Outcome:
        process_id, run_seq = job.args.get("process_id"), job.args.get("run_seq")
        async with job.connection() as conn:
            taken = await self._take(conn, process_id, run_seq)
        if not isinstance(taken, dict):
            return taken
        step, attempt = taken["current_step"], taken["attempts"]
        started = now()
        try:
            async with asyncio.timeout(self.ptype.step_timeout):
                result = await self.ptype.step_function(step)(dict(taken["state"]))
        except TimeoutError:
            result = StepRetry(f"step {step} ran past {self.ptype.step_timeout:g}s")
        except Exception as exc:  # the user's step: a retry with the error, as for jobs
            result = StepRetry(f"{type(exc).__name__}: {exc}")
        if result is None:
            result = StepDone()
        if not isinstance(result, StepDone | StepRetry | StepError):
            result = StepRetry(f"step {step} returned {result!r}, not a StepDone/StepRetry/StepError")
        async with job.connection() as conn:
            outcome = await self._record(conn, process_id, run_seq, step, attempt, started, result)
        return outcome

    async def _take(self, conn: psycopg.AsyncConnection[Any], process_id: Any,
                    run_seq: Any) -> dict[str, Any] | Outcome:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(sql.query("process_take_lock"), {"id": process_id})
        row = await cur.fetchone()
        if row is None or row["run_seq"] != run_seq or row["status"] not in ("pending", "retry", "running"):
            return Done(detail={"skipped": "the process has moved on since this job was queued"})
        if row["version"] > self.ptype.version:
            return Postpone(60.0, f"process {process_id} started on {self.ptype.key} version "
                                  f"{row['version']}; this worker runs version {self.ptype.version}")
        await cur.execute(sql.query("process_quiet_until"), {"at": now()})
        quiet = await cur.fetchone()
        if quiet is not None and quiet["process_quiet_until"] is not None:
            until = quiet["process_quiet_until"]
            return Postpone(max(1.0, (until - now()).total_seconds()),
                            f"quiet window: no step starts until {until.isoformat()}")
        step = row["current_step"]
        if step not in self.ptype.names:
            error = (f"step {step!r} of process {process_id} (started on version {row['version']}) does not "
                     f"exist in {self.ptype.key} version {self.ptype.version}; its steps: "
                     f"{', '.join(self.ptype.names)}. Restart it from a step: pgdispatch process restart "
                     f"{process_id} --from-step NAME")
            await conn.execute(sql.query("process_fail"), {
                "id": process_id, "step": step, "attempt": row["attempts"], "error": error,
                "version": self.ptype.version, "started_at": None})
            return Done(detail={"process_id": process_id, "error": error})
        await cur.execute(sql.query("process_take"), {"id": process_id})
        taken = await cur.fetchone()
        assert taken is not None
        return taken

    async def _record(self, conn: psycopg.AsyncConnection[Any], process_id: Any, run_seq: Any, step: str,
                      attempt: int, started: Any, result: StepResult) -> Outcome:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(sql.query("process_take_lock"), {"id": process_id})
        row = await cur.fetchone()
        if row is None or row["run_seq"] != run_seq or row["status"] != "running":
            return Done(detail={"skipped": "the process was abandoned or restarted during the step"})
        common = {"id": process_id, "step": step, "attempt": attempt, "version": self.ptype.version,
                  "started_at": started}
        if isinstance(result, StepDone):
            names = self.ptype.names
            following = names[names.index(step) + 1] if step != names[-1] else None
            await conn.execute(sql.query("process_step_done"), {
                **common, "message": result.message, "payload": _payload(result.payload),
                "state": Jsonb(dict(result.state or {})), "next_step": following})
            if following is not None:
                await conn.execute(sql.query("process_enqueue_step"), {"id": process_id, "delay": 0.0})
            return Done(detail={"process_id": process_id, "step": step, "next": following})
        if isinstance(result, StepRetry) and attempt < self.ptype.max_attempts:
            delay = self.ptype.delay(attempt, result.after)
            await conn.execute(sql.query("process_step_retry"),
                               {**common, "error": result.reason, "delay": delay})
            await conn.execute(sql.query("process_enqueue_step"), {"id": process_id, "delay": delay})
            return Done(detail={"process_id": process_id, "step": step, "retry_in": delay})
        error = result.message if isinstance(result, StepError) else (
            f"{result.reason} (attempt {attempt} of {self.ptype.max_attempts})")
        await conn.execute(sql.query("process_fail"), {**common, "error": error})
        return Done(detail={"process_id": process_id, "step": step, "error": error})


def _payload(payload: Any) -> Jsonb | None:
    if payload is None:
        return None
    text = json.dumps(payload, default=str)
    if len(text.encode()) > PAYLOAD_LIMIT:
        return Jsonb({"truncated": True, "excerpt": text[:PAYLOAD_LIMIT]})
    return Jsonb(payload if isinstance(payload, dict | list) else {"value": payload})
