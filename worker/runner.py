"""One worker process: claims jobs into its slots, runs their executors, writes outcomes back.

Wake-ups come from NOTIFY (sub-millisecond) with polling as the safety net. Leases are
extended for every running job on one timer, expired leases of other (dead) workers are rescued
on another, and SIGTERM stops claiming, waits for running jobs, then releases the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

import psutil
from psycopg_pool import PoolTimeout

from pgdispatch.db.connections import check_soon, open_pool
from pgdispatch.db.errors import DatabaseUnavailable
from pgdispatch.notify import CANCEL_CHANNEL, CONFIG_CHANNEL, JOBS_CHANNEL, config_message
from pgdispatch.notify.listener import Listener
from pgdispatch.notify.queue_policies import QueuePolicies, QueuePolicy
from pgdispatch.worker import telemetry
from pgdispatch.worker.attempt import Executor, Tally, finish_for, run_attempt
from pgdispatch.worker.config import WorkerConfig
from pgdispatch.worker.deadlines import Deadlines
from pgdispatch.worker.engine import Engine, Finish, OutcomeWriter
from pgdispatch.worker.job import Job
from pgdispatch.worker.services import periodic, supervised

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_NEWER_BUILD = 10
EXIT_RECYCLE = 11  # memory limit reached: finished cleanly, start me again
EXIT_NO_DATABASE = 4  # the database could not be reached at start
EXIT_SCHEMA_MISSING = 12  # a worker process found no (or an older) schema: the pool stops, exit 1

ALL_QUEUES = "*"  # how dispatch.workers records a worker that serves every queue
MAINTENANCE_EVERY = 3600.0
MAINTENANCE_DUTY_LEASE = 2 * MAINTENANCE_EVERY
VACUUM_DUTY_LEASE = 60.0
VACUUM_MAX_BACKOFF = 60.0
PROBE_TABLE = "listener_probe"
PROBE_SECONDS = 2.0  # a NOTIFY takes milliseconds; past this, the LISTEN connection hears nothing


def new_worker_id() -> str:
    """host:pid:random, the worker's id in dispatch.workers (and its slots' holder in
    dispatch.limit_slots)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Runner:
    def __init__(self, config: WorkerConfig, executors: Mapping[str, Executor], *,
                 on_config_change: Callable[[str | None], None] | None = None,
                 stats: Callable[[], Mapping[str, Any]] | None = None) -> None:
        """`on_config_change` runs on every NOTIFY on the config channel and after every
        reconnect: the hook for caches the executors keep (signing keys). `stats` returns the
        executors' own figures (cache counters, open circuits), published with each heartbeat."""
        if not executors:
            raise ValueError("a worker needs at least one executor")
        self.config = config
        self.executors = dict(executors)
        self.kinds = sorted(self.executors)
        self.worker_id = config.worker_name or new_worker_id()
        self.counters = Tally()
        self.cancelled = 0  # running jobs stopped because an operator cancelled them
        self.exit_code = EXIT_OK
        self._running: dict[uuid.UUID, tuple[Job, asyncio.Task[None]]] = {}
        self._per_queue: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._release_now = asyncio.Event()
        self._lost: set[uuid.UUID] = set()
        self._last_claim = 0.0
        # Queues whose last claim came back empty, and when: not claimed again until a NOTIFY
        # names them or a poll interval has passed (scheduled jobs coming due send none), so a
        # worker draining one queue of several spends one claim per batch, not one per queue.
        self._quiet: dict[str, float] = {}
        self._round = 0  # claim rounds, to rotate which queue asks first
        self._released: dict[int, float] = {}  # drain: jobs this worker put back, and when due
        self.started = asyncio.Event()
        self._on_config_change = on_config_change
        self._stats = stats
        self._process = psutil.Process()
        self._vacuum_backoff = config.vacuum_interval
        self._probes: dict[str, asyncio.Event] = {}
        self._deadlines = Deadlines()  # the queues' job timeouts, one ticker for every running job

    # -- lifecycle -------------------------------------------------------------------------

    def stop(self, exit_code: int = EXIT_OK) -> None:
        """Stop claiming; run() then finishes or releases what is running and returns."""
        if not self._stopping.is_set():
            log.info("worker %s stopping", self.worker_id)
            self.exit_code = exit_code
            self._stopping.set()
            self._wake.set()

    def signalled(self) -> None:
        """SIGTERM / Ctrl-C: the first stops claiming and gives running jobs the grace period;
        a second releases them at once."""
        if not self._stopping.is_set():
            log.warning("stopping: no new claims; waiting up to %gs for %d running jobs "
                        "(signal again to release them now)", self.config.grace_seconds,
                        len(self._running))
            self.stop()
        else:
            self.release_now()

    def release_now(self) -> None:
        """Stop, and release running jobs at once instead of waiting for the grace period."""
        self.stop()
        if not self._release_now.is_set():
            log.warning("releasing %d running jobs now", len(self._running))
            self._release_now.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self) -> int:
        cfg = self.config
        pool = open_pool(cfg.database_url, settings=cfg.connections, name="engine", min_size=2,
                         max_size=cfg.pool_size)
        try:
            await pool.open(wait=True, timeout=cfg.connect_timeout)
        except PoolTimeout:
            await pool.close()
            raise DatabaseUnavailable(f"database unavailable: no connection within "
                                      f"{cfg.connect_timeout:g}s") from None
        self.engine = Engine(pool, database_url=cfg.listen_url or cfg.database_url, worker_id=self.worker_id,
                             version=cfg.version, lease_seconds=cfg.lease_seconds, settings=cfg.connections)
        self.policies = QueuePolicies(pool)
        self.writer = OutcomeWriter(self.engine)
        await self.policies.reload()
        self._warn_unknown_queues()
        listener = Listener(cfg.listen_url or cfg.database_url,
                            [JOBS_CHANNEL, CONFIG_CHANNEL, CANCEL_CHANNEL],
                            on_notify=self._on_notify, on_reconnect=self._on_reconnect,
                            settings=cfg.connections)
        self.listener = listener
        await self.engine.register(queues=list(cfg.queues) or [ALL_QUEUES],
                                   slots=cfg.concurrency, kinds=self.kinds)
        try:  # partitions ahead before the first outcome; never a reason not to start
            if await self._hold_maintenance():
                await self._maintain()
        except Exception as exc:
            log.warning("history maintenance failed: %s", exc)
        background = [
            asyncio.create_task(supervised("outcome writer", self.writer.run), name="outcome-writer"),
            asyncio.create_task(supervised("listener", listener.run), name="listener"),
            asyncio.create_task(periodic("heartbeat", cfg.lease_seconds / 3, self._heartbeat),
                                name="heartbeat"),
            asyncio.create_task(periodic("rescue", cfg.rescue_interval, self._rescue), name="rescue"),
            asyncio.create_task(supervised("policy refresh", self.policies.refresh_forever),
                                name="policy-refresh"),
            asyncio.create_task(periodic(
                "history maintenance", MAINTENANCE_EVERY, self._maintain,
                elect=self._hold_maintenance),
                name="maintenance"),
        ]
        if cfg.vacuum_min_dead_tuples:
            background.append(asyncio.create_task(periodic(
                "vacuum of dispatch.jobs", cfg.vacuum_interval, self._vacuum,
                elect=lambda: self.engine.take_duty("vacuum", VACUUM_DUTY_LEASE)), name="vacuum"))
        with contextlib.suppress(TimeoutError):  # polling covers a slow LISTEN start
            await asyncio.wait_for(listener.connected.wait(), timeout=5)
        if listener.connected.is_set() and not await self._notify_reaches_listener():
            log.warning("a NOTIFY sent through the database URL did not reach this worker's LISTEN "
                        "connection within %gs: is %s a pooler in transaction mode (PgBouncer), which "
                        "delivers no notifications? Wake-ups fall back to polling every %gs; give "
                        "--listen-url a direct URL to the server", PROBE_SECONDS,
                        "--listen-url" if cfg.listen_url else "DATABASE_URL", cfg.poll_interval)
        with contextlib.suppress(Exception):  # /stats has this process's figures from the start
            await self._write_heartbeat()
        self.started.set()
        if cfg.drain:
            # Jobs of workers that died are runnable once rescued: rescue before the first look.
            with contextlib.suppress(Exception):
                await self.engine.rescue_expired()
        try:
            await self._claim_loop()
            await self._finish_running()
            await self.writer.drained()
            if cfg.drain:
                await self._report_left_waiting()
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._write_heartbeat()
                await self.engine.stopped()
            await pool.close()
        log.info("worker %s stopped (completed %d, retried %d, dead %d, released %d; %d outcomes "
                 "ignored because the lease had moved on)", self.worker_id, self.counters.completed,
                 self.counters.retried, self.counters.dead, self.counters.released,
                 self.writer.ignored)
        return self.exit_code

    async def _hold_maintenance(self) -> bool:
        return await self.engine.take_duty("maintenance", MAINTENANCE_DUTY_LEASE)

    def queues(self) -> list[str]:
        """The queues this worker serves: those it was given, else every queue that exists
        (a queue created later is served from the next policy reload on)."""
        return list(self.config.queues) or self.policies.names()

    # -- claiming --------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        cfg = self.config
        settled = False  # drain: every outcome written and one more claim round came back empty
        while not self._stopping.is_set():
            self._wake.clear()
            claimed_full = claimed_any = failed = capped = False
            now = time.monotonic()
            candidates = [q for q in self.queues()
                          if q not in self._quiet or now - self._quiet[q] >= cfg.poll_interval]
            # Fair shares: the free slots are split among the queues that may have work, and the
            # first to ask changes each round, so a backlog in one queue cannot take every slot
            # round after round while another queue's jobs wait for it to drain.
            self._round += 1
            if candidates:
                start = self._round % len(candidates)
                candidates = candidates[start:] + candidates[:start]
            for position, queue in enumerate(candidates):
                free = self._free_slots(self.policies.get(queue))
                if free <= 0:
                    capped = capped or self._free_slots(None) > 0
                    continue
                share = -(-self._free_slots(None) // (len(candidates) - position))
                want = min(free, cfg.max_batch, share)
                try:
                    self._last_claim = time.monotonic()
                    jobs = await self.engine.claim(queue, self.kinds, want)
                except Exception as exc:  # database restarting: back off, never die
                    log.warning("claim from %s failed: %s", queue, exc)
                    check_soon(self.engine.pool)  # its other idle connections are likely dead too
                    failed = True
                    await self._sleep_or_stop(min(cfg.poll_interval, 1.0))
                    continue
                for job in jobs:
                    self._start(job)
                if jobs:
                    self._quiet.pop(queue, None)
                else:
                    self._quiet[queue] = self._last_claim
                claimed_any = claimed_any or bool(jobs)
                claimed_full = claimed_full or len(jobs) == want
            if cfg.drain and not claimed_any and not failed:
                self._quiet.clear()  # a drain ends only after every queue has been looked at
                if self._running:
                    await self._wait_for_slot()
                elif self.writer.pending or not settled:
                    # Outcomes just written may make retries runnable now: look once more.
                    await self.writer.drained()
                    settled = True
                elif self._released_due():
                    # Jobs this drain put back (a host at its cap, an open circuit) are runnable
                    # work: wait for the first to come due, then claim again.
                    await self._sleep_or_stop(self._released_due())
                else:
                    return
                continue
            settled = False
            if self._free_slots(None) <= 0 or (cfg.drain and not claimed_full):
                await self._wait_for_slot()
            elif not claimed_full:
                # A queue at its concurrency cap gets its next claim as soon as one of its jobs
                # finishes, not at the next poll.
                await self._wait_for_wake(cfg.poll_interval, slot_freed=capped)

    async def _report_left_waiting(self) -> None:
        with contextlib.suppress(Exception):  # advice only: never fail a drain over it
            waiting = await self.engine.kinds_waiting_unknown(self.queues(), self.kinds)
            if waiting:
                listed = ", ".join(f"{kind} ({n})" for kind, n in waiting.items())
                log.warning("drained; left waiting, as this worker does not run their kind or "
                            "build: %s%s", listed,
                            " (debug.* kinds run only with --debug-kinds)"
                            if not self.config.debug_kinds and any(k.startswith("debug.") for k in waiting)
                            else "")

    def _released_due(self) -> float:
        """Seconds until the first job this worker released comes due again (0: none left).
        One due well before the last claim that did not get it was taken by another worker (the
        margin covers the database's clock, which set its run_at)."""
        self._released = {job_id: due for job_id, due in self._released.items()
                          if due + 1.0 > self._last_claim}
        if not self._released:
            return 0.0
        return max(min(self._released.values()) - time.monotonic(), 0.0) + 0.05

    def _free_slots(self, policy: QueuePolicy | None) -> int:
        free = self.config.concurrency - len(self._running)
        if policy is None:
            return free
        if policy.paused:
            return 0
        if policy.concurrency is not None:
            free = min(free, policy.concurrency - self._per_queue.get(policy.name, 0))
        return free

    def _warn_unknown_queues(self) -> None:
        missing = [q for q in self.config.queues if self.policies.get(q) is None]
        if missing:
            log.warning("queues %s do not exist in dispatch.queues: nothing will be claimed from "
                        "them until they are created", missing)

    async def _wait_for_wake(self, timeout: float, *, slot_freed: bool = False) -> None:
        self._slot_freed.clear()
        waiters = [asyncio.ensure_future(self._wake.wait())]
        if slot_freed:
            waiters.append(asyncio.ensure_future(self._slot_freed.wait()))
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        # Debounce (River's fetch cooldown): a burst of NOTIFYs, one per inserting
        # transaction, becomes one claim per cooldown rather than one claim each.
        cooldown = self._last_claim + self.config.fetch_cooldown - time.monotonic()
        if cooldown > 0 and not self._stopping.is_set():
            await asyncio.sleep(cooldown)

    async def _wait_for_slot(self) -> None:
        self._slot_freed.clear()
        waiters = [asyncio.ensure_future(self._slot_freed.wait()),
                   asyncio.ensure_future(self._stopping.wait())]
        try:
            await asyncio.wait(waiters, timeout=self.config.poll_interval,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        # Jobs tend to finish together (a batch of fast ones): let the others that are ready
        # finish too, so the next claim takes a batch rather than one job at a time.
        await asyncio.sleep(0)

    async def _sleep_or_stop(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _notify_reaches_listener(self) -> bool:
        """Whether a NOTIFY sent through the engine's pool comes back on the LISTEN connection."""
        token = uuid.uuid4().hex
        heard = self._probes[token] = asyncio.Event()
        try:
            await self.engine.notify_probe(json.dumps({"table": PROBE_TABLE, "token": token}))
            await asyncio.wait_for(heard.wait(), PROBE_SECONDS)
            return True
        except TimeoutError:
            return False
        except Exception as exc:  # the database's trouble is reported elsewhere
            log.debug("listener probe failed: %s", exc)
            return True
        finally:
            self._probes.pop(token, None)

    def _on_notify(self, channel: str, payload: str) -> None:
        if channel == CANCEL_CHANNEL:
            self._cancel(payload)
        elif channel == JOBS_CHANNEL:
            if not self.config.queues or payload in self.config.queues:
                self._quiet.pop(payload, None)
                self._wake.set()
        elif channel == CONFIG_CHANNEL:
            message = config_message(payload)
            if message.get("table") == PROBE_TABLE:  # some worker's start-up check, not a change
                heard = self._probes.get(str(message.get("token")))
                if heard is not None:
                    heard.set()
                return
            if message.get("table") in ("queues", None):
                self.policies.invalidate()
                self._quiet.clear()
            if self._on_config_change is not None:
                self._on_config_change(payload)
            self._wake.set()

    def _cancel(self, payload: str) -> None:
        """An operator cancelled jobs this worker runs (dispatch.cancel_jobs_v1): their rows are
        already dead letters, so the executors stop now and write nothing. A message lost while
        the listener reconnects is made up for by the next heartbeat, which finds the leases gone."""
        message = config_message(payload)
        if message.get("worker") != self.worker_id or not isinstance(message.get("tokens"), list):
            return
        for text in message["tokens"]:
            try:
                token = uuid.UUID(str(text))
            except ValueError:
                continue
            entry = self._running.get(token)
            if entry is not None and token not in self._lost:
                job, task = entry
                log.info("job %s (%s, attempt %d) was cancelled by an operator: stopping it",
                         job.id, job.kind, job.attempt)
                self._lost.add(token)
                self.cancelled += 1
                task.cancel()

    async def _on_reconnect(self) -> None:
        # The server may have restarted: every idle pooled connection may be dead. Checked now,
        # not discovered one failed claim (or job) at a time.
        check_soon(self.engine.pool)
        self._quiet.clear()  # NOTIFYs sent while the listener was away were lost
        await self.policies.reload()
        if self._on_config_change is not None:
            self._on_config_change(None)
        self._wake.set()

    # -- running jobs ----------------------------------------------------------------------

    def _start(self, job: Job) -> None:
        self._released.pop(job.id, None)
        task = asyncio.create_task(self._execute(job))
        self._running[job.lease_token] = (job, task)
        self._per_queue[job.queue] = self._per_queue.get(job.queue, 0) + 1

    async def _execute(self, job: Job) -> None:
        policy = self.policies.get(job.queue)
        started = time.perf_counter()
        with telemetry.span(job) as span:
            try:
                outcome = await run_attempt(self.executors.get(job.kind), job,
                                            policy.job_timeout if policy else None, self._deadlines)
            except asyncio.CancelledError:
                # Shutdown past the grace period, our lease was taken over, or an operator
                # cancelled the job.
                if job.lease_token not in self._lost:
                    self._record(job, Finish(job.id, job.lease_token, "release"), started, span)
                raise
            finally:
                self._running.pop(job.lease_token, None)
                self._per_queue[job.queue] -= 1
                self._slot_freed.set()
            if job.lease_token in self._lost:
                return  # another worker owns this job now; the database would ignore us anyway
            self._record(job, finish_for(job, outcome, policy), started, span)

    def _record(self, job: Job, finish: Finish, started: float, span: Any = None) -> None:
        settled = self.counters.count(job, finish)
        if settled == "release" and self.config.drain and finish.delay:
            self._released[job.id] = time.monotonic() + finish.delay
        self.writer.add(finish)
        telemetry.observe(job, settled, time.perf_counter() - started)
        telemetry.settle_span(span, settled, finish.error)

    async def _finish_running(self) -> None:
        """Give running jobs the grace period, then release whatever is left."""
        if not self._running:
            return
        tasks = [task for _, task in self._running.values()]
        everything_done = asyncio.ensure_future(asyncio.wait(tasks))
        release_now = asyncio.ensure_future(self._release_now.wait())
        try:
            await asyncio.wait([everything_done, release_now], timeout=self.config.grace_seconds,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            everything_done.cancel()
            release_now.cancel()
        pending = [task for task in tasks if not task.done()]
        if pending:
            log.warning("grace period over: releasing %d running jobs", len(pending))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    # -- timers ----------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        lost = await self.engine.extend_leases([*self._running, *self.writer.pending_leases()])
        for token in lost:
            entry = self._running.get(token)
            if entry is not None:
                job, task = entry
                log.warning("lost the lease of job %s (attempt %d): abandoning it", job.id,
                            job.attempt)
                self._lost.add(token)
                task.cancel()
        await self._write_heartbeat()
        if self.config.exit_on_newer and not self.stopping and \
                await self.engine.newer_build_waiting(self.queues()):
            log.warning("jobs stamped with a newer build than %d are waiting: exiting so the "
                        "supervisor starts the new code", self.config.version)
            self.stop(EXIT_NEWER_BUILD)
        limit = self.config.memory_limit_mb
        if limit and not self.stopping and self._process.memory_info().rss > limit * 1024 * 1024:
            log.warning("memory limit %d MiB reached: finishing and exiting to be restarted", limit)
            self.stop(EXIT_RECYCLE)

    async def _write_heartbeat(self) -> None:
        c = self.counters
        stats = {"released": c.released, "cancelled": self.cancelled, "outcomes_pending": self.writer.pending,
                 "queue_policy_cache": asdict(self.policies.counters),
                 "outcomes_ignored": self.writer.ignored,
                 "listener_reconnects": self.listener.reconnects,
                 **(self._stats() if self._stats is not None else {})}
        await self.engine.heartbeat(running=len(self._running), completed=c.completed,
                                    retried=c.retried, dead=c.dead, stats=stats)

    async def _rescue(self) -> None:
        rescued = await self.engine.rescue_expired()
        if rescued:  # they come back after their backoff, like retries: nothing to claim now
            log.warning("rescued %d jobs whose lease expired", rescued)

    async def _vacuum(self) -> float | None:
        """Vacuum when dead rows pile up; back off (up to a minute) while they stay high after
        a vacuum, as when a long transaction keeps them from being removed."""
        ran = await self.engine.vacuum_jobs(min_dead_tuples=self.config.vacuum_min_dead_tuples)
        if not ran:
            self._vacuum_backoff = self.config.vacuum_interval
            return None
        delay = self._vacuum_backoff
        self._vacuum_backoff = min(VACUUM_MAX_BACKOFF, self._vacuum_backoff * 2)
        return delay

    async def _maintain(self) -> None:
        dropped = await self.engine.maintain(history_keep_seconds=self.config.history_keep_seconds,
                                             dead_keep_seconds=self.config.dead_keep_seconds)
        if dropped:
            log.info("dropped %d history partitions older than the retention", dropped)
