"""Limits shared by every worker process and host: rate limits, concurrency caps, circuit
breakers and Retry-After pauses, kept in PostgreSQL (dispatch.limits, dispatch.limit_state,
dispatch.limit_slots; sql/schema/03_limits.sql).

What keeps it cheap: rules are a snapshot in memory, reloaded on NOTIFY; tokens are taken in
blocks (one update of the bucket row per block, not per request, granted ahead of time when the
bucket is empty, so processes queue for it instead of fighting) and spent within a second;
requests a rate cannot serve within MAX_WAIT are given the key's next free send times, one
every 1/rate, and its queued backlog is scheduled after them (spread), once per key at a time
across all workers, so the claim never hands them out only to have them put back;
slots are held while this process has requests waiting for them and returned, many keys in one
round trip, once it has had none for a moment (SLOT_LINGER: a key's next request often comes
sooner, and takes the slot with no round trip at all);
breakers count failures in the process and write only their transitions, with a compare-and-
set for the one probe per cooldown; pauses and breaker transitions are announced with
pg_notify, and the jobs of a key that sends nothing are moved out of the claim's way (parked)
instead of being claimed and put back one by one. With no rule and nothing blocked, a request
costs a dictionary lookup.

Keys: host:<host[:port]>, tenant:<tenant>, tenant:<tenant>|host:<host[:port]>. A rule applies
to a key by name, or by a pattern with * in place of a part (host:*, tenant:*|host:*). A
producer's tenant is %-encoded in keys (tenant_part): whatever a producer writes, it can never
read like a pattern, like another key, or like a scope a feature owns (credential:ID,
enterprise:N:crm), which keep their colons.

Whatever happens to a caller (a job's timeout, a shutdown, a database error), a slot it took
is returned, or its lease runs out: the heartbeat renews exactly the slots this process holds
in memory and drops the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import psycopg
from psycopg.rows import class_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from pgdispatch import sql
from pgdispatch.db.connections import DIRECT, ConnectionSettings, open_pool
from pgdispatch.notify import config_message, log_failure
from pgdispatch.worker.batcher import Batcher
from pgdispatch.worker.outbound.transport import MAX_RETRY_AFTER

log = logging.getLogger(__name__)

TOKENS_LAST = 1.0  # tokens taken in a block are spent within this, or dropped
MAX_WAIT = 2.0  # the longest a job waits in its worker slot for a token
MAX_SLOT_WAIT = 10.0  # ... or for a slot, while slots keep coming free
STALLED = 1.0  # no slot came free for this long: the key's requests hang, stop waiting
SLOT_LINGER = 0.2  # a slot nobody here waits for is kept this long for the key's next request
PROBE_LEASE = 60.0  # a probe whose worker died is given to another after this
BLOCK_SHARE = 0.1  # a token block is this share of a second's rate
MAX_TRACKED = 10_000  # failure counts kept per process before they are forgotten
UNAVAILABLE_WAIT = 2.0  # the shared limits could not be read: try the job again after this
# Requests of a key that find its rate spent within this long share one spread (they are put
# back for seconds anyway): one round trip and one update of the key's row for all of them.
SPREAD_GATHER = 0.05

# Errors of the limits' own database: a job never pays for them (it is postponed instead).
DATABASE_ERRORS = (psycopg.Error, PoolTimeout, OSError)

# What a producer's tenant may not hold as it is in a key: the characters that structure keys
# (| between parts, : inside a feature's scope, * in patterns), the escape itself, and spaces.
_KEY_UNSAFE = re.compile(r"[%|:*\s\x00-\x1f\x7f]")


def tenant_part(tenant: str) -> str:
    """A producer's tenant as it appears in limit keys: %-encoded where it would be ambiguous
    (tenant `a|host:b` is `tenant:a%7Chost%3Ab`, never the key of tenant a at host b)."""
    return _KEY_UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), tenant)


@dataclass(frozen=True, slots=True)
class Rule:
    key: str
    rate: float | None
    burst: int | None
    concurrency: int | None
    breaker_failures: int | None
    breaker_cooldown: float | None


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing may be sent now: try again after `seconds` (no attempt is spent)."""

    seconds: float
    reason: str


@dataclass(slots=True)
class Permit:
    """What a request holds while it is sent; give it back with Limits.settle (or cancel)."""

    scope: str | None  # the tenant part of its keys (a producer's tenant, encoded; or a feature's scope)
    host: str
    # The producer's tenant as jobs carry it: the requests its breakers and pauses park. None
    # for a feature's scope, whose jobs are not requests: they are postponed one by one.
    job_tenant: str | None = None
    parks: bool = True
    slots: list[str] = field(default_factory=list)
    probe: str | None = None  # the breaker key this request probes


@dataclass(slots=True)
class _Blocked:
    until: float  # monotonic
    reason: str
    breaker: bool


@dataclass(slots=True)
class _Slots:
    held: int = 0
    in_use: int = 0
    waiting: int = 0
    progress: float = 0.0  # when a slot last came free or was granted here
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(slots=True)
class _Tokens:
    count: int = 0
    granted: int = 0  # the size of the last block
    ready: float = 0.0  # the block is usable from then (granted ahead of time)
    expires: float = 0.0
    waiting: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def want(self, block: int) -> int:
        """How many tokens to ask for: as many as the last block if some were dropped unspent
        (they are lost to every worker), twice as many when it was all spent, up to `block`,
        and never fewer than the jobs waiting here now."""
        spent = self.granted - max(self.count, 0)
        grown = 2 * spent if spent >= self.granted else spent
        return max(1, min(block, max(self.waiting, grown)))


@dataclass(frozen=True, slots=True)
class _Spread:
    """A request of a rate-limited key that its tokens cannot serve within MAX_WAIT."""

    rate: float
    burst: int
    reason: str
    host: str | None  # its queued backlog is scheduled too (requests name their host)
    job_tenant: str | None


@dataclass(slots=True)
class LimitCounters:
    admitted: int = 0
    waited_for_tokens: int = 0
    waited_for_slots: int = 0
    postponed: int = 0
    token_blocks: int = 0
    slot_round_trips: int = 0
    breakers_opened: int = 0
    probes: int = 0
    pauses: int = 0
    parked: int = 0
    spread: int = 0
    unavailable: int = 0


class Limits:
    def __init__(self, pool: AsyncConnectionPool, *, breaker_failures: int = 5,
                 breaker_cooldown: float = 30.0, slot_lease: float = 30.0, holder: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`slot_lease`: a killed worker's slots come back after this (the worker's --lease).
        `holder`: how this process's slots are named in dispatch.limit_slots (a worker passes
        its id in dispatch.workers)."""
        if breaker_failures < 1 or breaker_cooldown <= 0 or slot_lease <= 0:
            raise ValueError("breaker failures must be >= 1, cooldown and slot lease > 0")
        self.slot_lease = slot_lease
        self._pool = pool
        self.breaker_failures = breaker_failures
        self.breaker_cooldown = breaker_cooldown
        self.holder = holder or f"limits:{uuid.uuid4().hex[:12]}"
        self._clock = clock
        self._rules: dict[str, Rule] = {}
        self._blocked: dict[str, _Blocked] = {}
        self._failures: dict[str, int] = {}
        self._slots: dict[str, _Slots] = {}
        self._tokens: dict[str, _Tokens] = {}
        self._spreaders: dict[str, Batcher[_Spread, float]] = {}
        self._parking: dict[str, asyncio.Task[None]] = {}
        self._spare_since: dict[str, float] = {}  # keys with a slot nobody here uses, since when
        self._releasing: asyncio.Task[None] | None = None
        self._reloading: asyncio.Task[None] | None = None
        self._renewed = True  # the first beat reconciles whatever an earlier run of this holder left
        self.counters = LimitCounters()

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, database_url: str, *, settings: ConnectionSettings = DIRECT,
                   **kwargs: Any) -> AsyncIterator[Limits]:
        """Limits on a small pool of their own, loaded, with the slot-lease heartbeat running."""
        pool = open_pool(database_url, settings=settings, name="limits", min_size=1, max_size=4)
        await pool.open(wait=False)
        limits = cls(pool, **kwargs)
        heartbeat = None
        try:
            try:
                await limits.reload()
            except Exception as exc:  # the runner reports an unreachable database
                log.warning("shared limits not loaded yet: %s", exc)
                limits._background(limits._reload_until_done())
            heartbeat = asyncio.create_task(limits.renew_forever(), name="limit-slots")
            yield limits
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await heartbeat
            with contextlib.suppress(Exception):
                await limits.release_all()
            await limits.finish_parks()
            await pool.close()

    @property
    def pool(self) -> AsyncConnectionPool:
        return self._pool

    # -- what applies -------------------------------------------------------------------------

    def keys(self, tenant: str | None, host: str) -> list[str]:
        """The limit keys of a producer's request, the narrowest first (`tenant` encoded by
        tenant_part)."""
        if tenant is None:
            return [f"host:{host}"]
        return self.scope_keys([tenant_part(tenant)], host)

    @staticmethod
    def scope_keys(scopes: Sequence[str], host: str) -> list[str]:
        """The limit keys of a request in `scopes` (the first also names its breaker, with the
        host), the narrowest first."""
        first, *others = scopes
        return [f"tenant:{first}|host:{host}", f"host:{host}", f"tenant:{first}",
                *(f"tenant:{scope}" for scope in others)]

    def rule_for(self, key: str) -> Rule | None:
        """The rule of `key`: by name, else the pattern with the fewest stars that matches
        (tenant:acme|host:* before tenant:*|host:api.example.com before tenant:*|host:*)."""
        rule = self._rules.get(key)
        if rule is not None or not self._rules:
            return rule
        parts = key.split("|")
        starred = [part.split(":", 1)[0] + ":*" for part in parts]
        for stars in sorted(itertools.product((False, True), repeat=len(parts)), key=sum)[1:]:
            pattern = "|".join(s if star else p for p, s, star in zip(parts, starred, stars, strict=True))
            rule = self._rules.get(pattern)
            if rule is not None:
                return rule
        return None

    def _breaker_settings(self, key: str) -> tuple[int, float]:
        rule = self.rule_for(key)
        failures = rule.breaker_failures if rule and rule.breaker_failures else self.breaker_failures
        cooldown = rule.breaker_cooldown if rule and rule.breaker_cooldown else self.breaker_cooldown
        return failures, cooldown

    # -- admission ----------------------------------------------------------------------------

    async def admit(self, tenant: str | None, host: str) -> Permit | Wait:
        """A Permit when a producer's request to `host` for `tenant` may go out now (waiting up
        to MAX_WAIT for a token or a slot), else how long to wait. Checks blocks (pauses, open
        breakers), then rates, then concurrency, then takes the probe of a half-open breaker.

        Never raises for the limits' own database (a pool timeout, a restart): the request is
        postponed, and no attempt is spent. Whatever becomes of the caller (cancelled at any
        await, an error), the slots taken so far are given back."""
        permit = Permit(None if tenant is None else tenant_part(tenant), host, job_tenant=tenant)
        return await self._admit_keys(permit, lambda: self.keys(tenant, host))

    async def admit_scopes(self, scopes: Sequence[str], host: str) -> Permit | Wait:
        """As admit, for a feature's request: its own scopes (a lead credential's vendor
        scopes, telegram-bot:HASH and its chat; an enterprise's CRM, enterprise:N:crm), which
        no producer's tenant can name. The first names its breaker (with the host)."""
        return await self._admit_keys(Permit(scopes[0], host, parks=False),
                                      lambda: self.scope_keys(scopes, host))

    async def _admit_keys(self, permit: Permit, keys: Callable[[], list[str]]) -> Permit | Wait:
        if not self._rules and not self._blocked:
            self.counters.admitted += 1
            return permit  # the unlimited path: nothing configured, nothing blocked
        try:
            admitted = await self._admit(permit, keys())
        except BaseException as exc:
            self.cancel(permit)
            if not isinstance(exc, DATABASE_ERRORS):
                raise
            self.counters.unavailable += 1
            log.warning("shared limits unavailable (%s): postponing the request", type(exc).__name__)
            return self._postpone(UNAVAILABLE_WAIT, "not sent: the shared limits could not be read "
                                                    f"({type(exc).__name__}); trying again shortly")
        if isinstance(admitted, Wait):
            self.cancel(permit)
        return admitted

    async def _admit(self, permit: Permit, keys: list[str]) -> Permit | Wait:
        now = self._clock()
        half_open: str | None = None
        for key in keys:
            blocked = self._blocked.get(key)
            if blocked is None:
                continue
            if blocked.until > now:
                return self._postpone(blocked.until - now, f"not sent: {key} {blocked.reason}")
            if blocked.breaker:
                half_open = key
            else:
                del self._blocked[key]  # a pause that ended
        for key in keys:
            rule = self.rule_for(key)
            if rule is None:
                continue
            if rule.rate is not None:
                ready_in = await self._token(key, rule)
                if ready_in is not None:
                    return await self._spread(permit, key, rule, ready_in)
            if rule.concurrency is not None:
                if not await self._slot(key, rule.concurrency):
                    return self._postpone(1.0, f"not sent: {key} has {rule.concurrency} requests "
                                               "in flight across all workers")
                permit.slots.append(key)
        if half_open is not None:
            if not await self._take_probe(half_open):
                return self._postpone(min(self._breaker_settings(half_open)[1], 5.0),
                                      f"not sent: {half_open} circuit half-open, its probe is out")
            permit.probe = half_open
        self.counters.admitted += 1
        return permit

    def _postpone(self, seconds: float, reason: str) -> Wait:
        self.counters.postponed += 1
        return Wait(seconds + random.random() * min(1.0, seconds), reason)

    async def _token(self, key: str, rule: Rule) -> float | None:
        """None when a token was taken (after waiting for it, up to MAX_WAIT), else how long
        until the bucket would have one."""
        assert rule.rate is not None
        tokens = self._tokens.setdefault(key, _Tokens())
        tokens.waiting += 1
        try:
            while True:
                now = self._clock()
                if tokens.count > 0 and tokens.expires > now:
                    tokens.count -= 1
                    if tokens.ready > now:
                        self.counters.waited_for_tokens += 1
                        await asyncio.sleep(tokens.ready - now)
                    return None
                async with tokens.lock:  # one block request per key at a time in this process
                    if tokens.count > 0 and tokens.expires > self._clock():
                        continue
                    burst = rule.burst or max(1, math.ceil(rule.rate))
                    block = max(1, min(burst, math.ceil(rule.rate * BLOCK_SHARE)))
                    async with self._pool.connection() as conn:
                        cur = await conn.execute(sql.query("take_tokens"), {
                            "key": key, "rate": rule.rate, "burst": burst,
                            "want": tokens.want(block), "max_wait": MAX_WAIT})
                        granted, ready_in = await cur.fetchone() or (0, 1.0)
                    if not granted:
                        return float(ready_in)
                    self.counters.token_blocks += 1
                    tokens.count = tokens.granted = int(granted)
                    tokens.ready = self._clock() + ready_in
                    tokens.expires = tokens.ready + TOKENS_LAST
        finally:
            tokens.waiting -= 1

    async def _spread(self, permit: Permit, key: str, rule: Rule, ready_in: float) -> Wait:
        """More requests wait for a rate-limited key than its tokens serve within MAX_WAIT: this
        one gets the key's next free send time (one every 1/rate, after those already given,
        across every worker), and the key's queued requests are scheduled after it, so the
        claim does not hand them out only to have them put back. The requests of one key that
        find it so at once share one round trip (one spread per key at a time in all)."""
        assert rule.rate is not None
        spreader = self._spreaders.get(key)
        if spreader is None:
            spreader = self._spreaders[key] = Batcher(
                lambda batch: self._spread_batch(key, batch), alone_after=lambda _: False, max_in_flight=1,
                gather=SPREAD_GATHER)
        reason = f"not sent: {key} is at its rate of {rule.rate:g}/s"
        seconds = await spreader.ask(_Spread(
            rule.rate, rule.burst or max(1, math.ceil(rule.rate)), reason,
            host=permit.host if permit.parks and "host:" in key else None,
            job_tenant=permit.job_tenant if key.startswith("tenant:") else None))
        self.counters.postponed += 1
        return Wait(max(seconds, ready_in), reason)

    async def _spread_batch(self, key: str, batch: Sequence[_Spread]) -> list[float]:
        first = batch[0]
        park = next((r for r in batch if r.host is not None), None)
        async with self._pool.connection() as conn:
            cur = await conn.execute(sql.query("spread_backlog"), {
                "key": key, "host": park.host if park else None, "tenant": park.job_tenant if park else None,
                "rate": first.rate, "burst": first.burst, "waiting": len(batch),
                "reason": first.reason[:500]})
            parked, first_in = await cur.fetchone() or (0, 1.0)
        self.counters.spread += 1
        self.counters.parked += parked
        return [first_in + i / first.rate for i in range(len(batch))]

    async def _slot(self, key: str, cap: int) -> bool:
        """Take a slot of `key`, waiting while slots keep coming free (a key at its cap whose
        requests finish quickly), up to MAX_SLOT_WAIT; a key whose slots stopped turning over
        (its requests hang) sends the job back to the queue after STALLED."""
        slots = self._slots.setdefault(key, _Slots())
        started = self._clock()
        slots.waiting += 1
        try:
            while True:
                if slots.held > slots.in_use:
                    slots.in_use += 1
                    return True
                now = self._clock()
                if now - started > MAX_SLOT_WAIT or (
                        now - started > STALLED and now - slots.progress > STALLED):
                    return False
                async with slots.lock:  # one poller per key in this process
                    if slots.held > slots.in_use:
                        continue
                    # Shielded: a slot the database grants is recorded here even when the
                    # caller is cancelled meanwhile (then it is spare, and given back).
                    if await asyncio.shield(self._acquire_slot(key, cap, slots)):
                        continue
                    self.counters.waited_for_slots += 1
                    await asyncio.sleep(0.02 + random.random() * 0.03)
        finally:
            slots.waiting -= 1
            self._maybe_spare(key, slots)

    async def _acquire_slot(self, key: str, cap: int, slots: _Slots) -> int:
        async with self._pool.connection() as conn:
            cur = await conn.execute(sql.query("acquire_slots"), {
                "key": key, "holder": self.holder, "cap": cap, "want": 1,
                "lease": timedelta(seconds=self.slot_lease)})
            row = await cur.fetchone()
        self.counters.slot_round_trips += 1
        granted = int(row[0]) if row and row[0] else 0
        if granted:
            slots.held += granted
            slots.progress = self._clock()
            self._maybe_spare(key, slots)  # its caller may be gone
        return granted

    def _give_back(self, permit: Permit) -> None:
        for key in permit.slots:
            self._free_slot(key)
        permit.slots.clear()

    def _free_slot(self, key: str) -> None:
        slots = self._slots[key]
        slots.in_use -= 1
        slots.progress = self._clock()
        self._maybe_spare(key, slots)

    def _maybe_spare(self, key: str, slots: _Slots) -> None:
        if slots.waiting == 0 and slots.held > slots.in_use:  # nobody here wants it, for now
            self._spare_since.setdefault(key, self._clock())
            if self._releasing is None or self._releasing.done():
                self._releasing = self._background(self._release_spare_slots())

    async def _release_spare_slots(self) -> None:
        """Give the other workers back the slots this process has not used for SLOT_LINGER, every
        key's in one round trip; until no slot is spare."""
        while self._spare_since:
            await asyncio.sleep(SLOT_LINGER / 2)
            due = self._clock() - SLOT_LINGER
            keys, counts = [], []
            for key, since in list(self._spare_since.items()):
                slots = self._slots.get(key)
                if slots is None or slots.held <= slots.in_use:
                    del self._spare_since[key]  # in use again
                elif since <= due and slots.waiting == 0:
                    del self._spare_since[key]
                    keys.append(key)
                    counts.append(slots.held - slots.in_use)
                    slots.held = slots.in_use
            if not keys:
                continue
            try:
                async with self._pool.connection() as conn:
                    await conn.execute(sql.query("release_slots"), {
                        "keys": keys, "counts": counts, "holder": self.holder})
                self.counters.slot_round_trips += 1
            except Exception as exc:  # the heartbeat drops them (it renews only what is held)
                log.warning("shared limits: returning slots failed: %s", exc)

    async def _take_probe(self, key: str) -> bool:
        async with self._pool.connection() as conn:
            cur = await conn.execute(sql.query("take_probe"), {
                "key": key, "holder": self.holder, "lease": timedelta(seconds=PROBE_LEASE)})
            won = (await cur.fetchone() or (None,))[0] is True
        if won:
            self.counters.probes += 1
            log.info("circuit %s half-open: this worker sends the one probe", key)
        return won

    # -- after the request --------------------------------------------------------------------

    async def settle(self, permit: Permit, *, failed: bool, retry_after: float | None = None,
                     reason: str = "") -> None:
        """Give back the permit's slots and learn from the outcome: a failure counts towards
        the breaker of (tenant, host); a probe's result closes or reopens it; a Retry-After
        pauses the key for every worker (and is no breaker failure: the vendor said when)."""
        self._give_back(permit)
        if not failed and permit.probe is None and not self._failures and not retry_after:
            return  # the common case: a success with nothing to reset, no key to even name
        breaker_key = f"tenant:{permit.scope}|host:{permit.host}" if permit.scope else f"host:{permit.host}"
        try:
            if retry_after is not None and retry_after > 0:
                await self._pause(permit, breaker_key, retry_after, reason)
                failed = False
            if permit.probe is not None:
                if failed:
                    await self._open(permit, permit.probe, f"after its probe failed ({reason})")
                else:
                    await self._close(permit, permit.probe)
            elif failed:
                if len(self._failures) > MAX_TRACKED and breaker_key not in self._failures:
                    self._failures.clear()  # many hosts failing now and then: counts are advice
                count = self._failures.get(breaker_key, 0) + 1
                self._failures[breaker_key] = count
                if count >= self._breaker_settings(breaker_key)[0]:
                    self._failures.pop(breaker_key, None)
                    await self._open(permit, breaker_key, f"after {count} consecutive failures ({reason})")
            elif self._failures:
                self._failures.pop(breaker_key, None)
        except Exception as exc:  # limits are advice to the delivery: never fail a job over them
            log.warning("shared limits: could not record the outcome for %s: %s", breaker_key, exc)

    def cancel(self, permit: Permit) -> None:
        """The request never went out (shutdown, a cancelled job): slots back, the probe to
        another worker."""
        self._give_back(permit)
        if permit.probe is not None:
            self._background(self._drop_probe(permit.probe))
            permit.probe = None

    async def _drop_probe(self, key: str) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(sql.query("drop_probe"), {"key": key, "holder": self.holder})

    async def _open(self, permit: Permit, key: str, reason: str) -> None:
        _, cooldown = self._breaker_settings(key)
        async with self._pool.connection() as conn:
            cur = await conn.execute(sql.query("open_breaker"), {
                "key": key, "cooldown": timedelta(seconds=cooldown), "reason": reason[:500]})
            opened = (await cur.fetchone() or (False,))[0]
        self._blocked[key] = _Blocked(self._clock() + cooldown, f"circuit open {reason}"[:500], True)
        if not opened:
            return  # another worker opened it first, announced it and parked its requests
        self.counters.breakers_opened += 1
        log.warning("circuit %s open %s: nothing is sent for %gs, then one probe", key, reason, cooldown)
        # Its waiting requests leave the claim's way: the first comes back to carry the probe.
        self._park(permit, key, first_in=cooldown, others_in=2 * cooldown,
                   reason=f"not sent: circuit {key} open {reason}")

    async def _close(self, permit: Permit, key: str) -> None:
        self._blocked.pop(key, None)
        self._failures.pop(key, None)
        async with self._pool.connection() as conn:
            await conn.execute(sql.query("close_breaker"), {"key": key})
            cur = await conn.execute(sql.query("unpark_requests"), {
                "host": permit.host if permit.parks else None,
                "tenant": permit.job_tenant if key.startswith("tenant:") else None})
            back = (await cur.fetchone() or (0,))[0]
        log.warning("circuit %s closed: the probe succeeded (%d waiting requests back)", key, back)

    async def _pause(self, permit: Permit, key: str, seconds: float, reason: str) -> None:
        seconds = min(seconds, MAX_RETRY_AFTER)
        async with self._pool.connection() as conn:
            cur = await conn.execute(sql.query("pause_limit"), {
                "key": key, "seconds": timedelta(seconds=seconds), "reason": reason[:500]})
            extended = (await cur.fetchone() or (False,))[0]
        self._blocked[key] = _Blocked(self._clock() + seconds, reason[:500], False)
        if not extended:
            return  # another worker's pause already covers it, and parked the key's requests
        self.counters.pauses += 1
        log.info("%s paused for %gs by every worker: %s", key, seconds, reason)
        self._park(permit, key, first_in=seconds, others_in=seconds, reason=f"not sent: {key} {reason}")

    def _park(self, permit: Permit, key: str, *, first_in: float, others_in: float, reason: str) -> None:
        """Move the key's queued requests out of the claim's way, in the background (the caller's
        job has its outcome already), at most one park per key at a time in this process (and
        in all: the database skips a park of a key another worker is parking)."""
        if not permit.parks or "host:" not in key:
            return  # only requests name their host: other jobs are postponed one by one
        running = self._parking.get(key)
        if running is not None and not running.done():
            return
        self._parking[key] = self._background(self._park_now(
            key, permit.host, permit.job_tenant if key.startswith("tenant:") else None,
            first_in=first_in, others_in=others_in, reason=reason))

    async def _park_now(self, key: str, host: str, tenant: str | None, *, first_in: float,
                        others_in: float, reason: str) -> None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(sql.query("park_requests"), {
                "key": key, "host": host, "tenant": tenant,
                "first_in": timedelta(seconds=first_in), "others_in": timedelta(seconds=others_in),
                "reason": reason[:500]})
            self.counters.parked += (await cur.fetchone() or (0,))[0]

    # -- what other workers say ---------------------------------------------------------------

    def on_notify(self, payload: str | None) -> None:
        """A config-channel notification (None: the listener reconnected, reload everything)."""
        message = config_message(payload)
        table = message.get("table")
        if table == "limit_state" and isinstance(message.get("key"), str):
            self._apply_state(message["key"], message.get("paused_for"), message.get("pause_reason"),
                              message.get("open_for"), message.get("open_reason"))
        elif (payload is None or table in ("limits", None)) and (
                self._reloading is None or self._reloading.done()):
            self._reloading = self._background(self.reload())

    def _apply_state(self, key: str, paused_for: Any, pause_reason: Any, open_for: Any,
                     open_reason: Any) -> None:
        now = self._clock()
        if isinstance(open_for, int | float) and open_reason:
            # Open, or half-open when its time is up (the probe decides).
            self._blocked[key] = _Blocked(now + open_for, f"circuit open {open_reason}", True)
        elif isinstance(paused_for, int | float) and paused_for > 0:
            self._blocked[key] = _Blocked(now + paused_for, str(pause_reason or "paused"), False)
        else:
            self._blocked.pop(key, None)
            self._failures.pop(key, None)

    async def reload(self) -> None:
        """Rules and the keys that send nothing now, from the database."""
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=class_row(Rule))
            await cur.execute(sql.query("load_limits"))
            rules = {rule.key: rule for rule in await cur.fetchall()}
            state = await (await conn.execute(sql.query("blocked_limits"))).fetchall()
        self._rules = rules
        self._blocked.clear()
        for key, paused_for, pause_reason, open_for, open_reason in state:
            self._apply_state(key, paused_for, pause_reason, open_for, open_reason)

    async def _reload_until_done(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(Exception):
                await self.reload()
                return

    async def renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.slot_lease / 3)
            self._forget_idle_keys()
            try:
                await self.renew()
            except Exception as exc:  # the next beat tries again; leases outlive a few misses
                log.warning("shared limits: renewing slot leases failed: %s", exc)

    async def renew(self) -> None:
        """Renew the leases of exactly the slots this process holds in memory, and drop the
        rest: a slot the database granted to a caller that was gone before it could be
        recorded, or one whose return failed, cannot stay held for ever."""
        held = {key: s.held for key, s in self._slots.items() if s.held}
        if not held and not self._renewed:
            return
        async with self._pool.connection() as conn:
            await conn.execute(sql.query("renew_slots"), {
                "holder": self.holder, "keys": list(held), "counts": list(held.values()),
                "lease": timedelta(seconds=self.slot_lease)})
        self._renewed = bool(held)

    def _forget_idle_keys(self) -> None:
        """host:* rules make a key per host ever reached: keep only the ones in use."""
        now = self._clock()
        self._slots = {k: v for k, v in self._slots.items() if v.held or v.waiting or v.lock.locked()}
        self._tokens = {k: v for k, v in self._tokens.items()
                        if v.expires > now or v.waiting or v.lock.locked()}
        self._spreaders = {k: v for k, v in self._spreaders.items() if k in self._tokens}

    async def release_all(self) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(sql.query("release_all_slots"), {"holder": self.holder})
        self._slots.clear()

    async def finish_parks(self, timeout: float = 5.0) -> None:
        """Let parks under way finish (a few seconds at most) before the pool closes: a paused
        host's backlog moved aside is work a next worker need not redo."""
        pending = [task for task in self._parking.values() if not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    def _background(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.add_done_callback(log_failure(log, "shared limits"))
        return task

    def stats(self) -> dict[str, Any]:
        now = self._clock()
        return {"rules": len(self._rules),
                "blocked": {key: {"for": round(b.until - now, 1), "why": b.reason}
                            for key, b in self._blocked.items()},
                "slots_held": {key: s.held for key, s in self._slots.items() if s.held},
                **{name: getattr(self.counters, name) for name in self.counters.__dataclass_fields__}}
