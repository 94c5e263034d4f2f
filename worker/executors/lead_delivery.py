"""Kind `lead.deliver` (seed 002): one lead to one integration, through its channel adapter.

The job names a delivery (dispatch.send_lead made it); the lead and the credential are read
when the attempt starts, so a credential changed or disabled meanwhile is honoured. Requests
go through the worker's shared HTTP pool, its allow-list of destinations and the shared limits
(the credential's own: tenant:credential:ID), like every other outbound request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pgdispatch import sql
from pgdispatch.db.errors import DatabaseUnavailable
from pgdispatch.worker.channels import ADAPTERS, Delivery
from pgdispatch.worker.channels.delivery import CredentialRefresh, NotSent
from pgdispatch.worker.executors.context import ExecutorContext
from pgdispatch.worker.executors.outbound_io import LimitedIO
from pgdispatch.worker.job import ConnectionSource, Job
from pgdispatch.worker.outcome import Discard, Done, InvalidJob, Outcome, Postpone

TIMEOUT = 30.0  # seconds for one request; the job's own bound is the queue's (300 s)
REFRESH_LEASE = 30.0  # seconds a worker may take to refresh a credential's token
STORE_RETRIES = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)  # pauses between tries to store a refreshed token

log = logging.getLogger(__name__)


class LeadDeliveryExecutor:
    def __init__(self, context: ExecutorContext) -> None:
        self._context = context

    async def __call__(self, job: Job) -> Outcome:
        delivery_id = job.args.get("delivery_id")
        if not isinstance(delivery_id, int):
            raise InvalidJob(f"delivery_id must be an integer, got {delivery_id!r}")
        row = await self._load(delivery_id)
        if row is None:
            raise InvalidJob(f"no delivery {delivery_id}")
        if row["status"] != "pending":  # delivered by an earlier run of this job
            return Done(detail={"delivery": delivery_id, "already": row["status"]})
        if row["lead_id"] is None:
            return Discard("discarded", error=f"lead {row['delivery_lead_id']} no longer exists")
        if row["settings"] is None:
            return Discard("discarded", error=f"credential {row['credential_id']} was deleted")
        if not row["enabled"]:
            return Discard("discarded", error=f"credential {row['credential_id']} is disabled")
        adapter = ADAPTERS.get(row["type"])
        if adapter is None:
            return Discard("discarded", error=f"no adapter for channel {row['type']} in this build")
        delivery = Delivery(
            delivery_id=delivery_id, credential_id=row["credential_id"], type=row["type"],
            settings=row["settings"], lead_id=row["lead_id"], external_entity_id=row["external_entity_id"],
            external_project_id=row["external_project_id"], data=row["data"], created_at=row["created_at"])
        try:
            return await adapter(delivery, DeliveryIO(self._context, delivery.credential_id,
                                                      list(row["limit_scopes"] or [])))
        except NotSent as not_sent:
            return not_sent.outcome

    async def _load(self, delivery_id: int) -> dict[str, Any] | None:
        if self._context.database is None:
            raise RuntimeError("lead.deliver needs the executors' database pool")
        async with self._context.database() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(sql.query("lead_delivery"), {"delivery_id": delivery_id})
            return await cur.fetchone()


class DeliveryIO(LimitedIO):
    """ChannelIO for one delivery: limited in its credential's vendor scopes (a Telegram bot and
    its chat, an amoCRM account, a Bitrix24 portal; else the credential: dispatch.
    credential_limit_scopes), and the refresh lease on its row in dispatch.credentials."""

    def __init__(self, context: ExecutorContext, credential_id: int, scopes: list[str]) -> None:
        super().__init__(context, scopes or [f"credential:{credential_id}"], timeout=TIMEOUT)
        self._credential_id = credential_id

    @contextlib.asynccontextmanager
    async def credential_refresh(self) -> AsyncIterator[CredentialRefresh]:
        database = self._context.database
        assert database is not None
        holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        waited = 0.0
        while True:
            async with database() as conn:
                cur = await conn.execute(sql.query("begin_credential_refresh"), {
                    "id": self._credential_id, "holder": holder, "lease": timedelta(seconds=REFRESH_LEASE)})
                row = await cur.fetchone()
                if row is None:
                    cur = await conn.execute(sql.query("credential_exists"), {"id": self._credential_id})
                    if await cur.fetchone() is None:
                        raise NotSent(Discard("discarded",
                                              error=f"credential {self._credential_id} was deleted"))
            if row is not None:
                break
            if waited > REFRESH_LEASE:
                raise NotSent(Postpone(5.0, f"credential {self._credential_id}: another worker is "
                                            "refreshing its token"))
            await asyncio.sleep(0.1)  # another worker refreshes: it will have stored a new token
            waited += 0.1
        refresh = _Refresh(dict(row[0]), database, self._credential_id, holder)
        try:
            yield refresh
        finally:
            if not refresh.stored:  # the lease back, whatever happened (shielded: it must land)
                await asyncio.shield(refresh.finish(None))


@dataclass
class _Refresh:
    settings: dict[str, Any]
    database: ConnectionSource
    credential_id: int
    holder: str
    stored: bool = False

    async def save(self, **changes: Any) -> None:
        self.settings.update(changes)
        await asyncio.shield(self._store(changes))
        self.stored = True

    async def _store(self, changes: dict[str, Any]) -> None:
        """The vendor has already voided the old token: a connection lost now must not lose the
        new one, so the write is tried again (over about 30 s) before giving up loudly."""
        for pause in STORE_RETRIES:
            try:
                await self.finish(changes)
                return
            except (psycopg.OperationalError, DatabaseUnavailable) as exc:
                log.warning("credential %s: storing its refreshed token failed (%s), again in %gs",
                            self.credential_id, exc, pause)
                await asyncio.sleep(pause)
        await self.finish(changes)

    async def finish(self, changes: dict[str, Any] | None) -> None:
        async with self.database() as conn:
            await conn.execute(sql.query("finish_credential_refresh"), {
                "id": self.credential_id, "holder": self.holder,
                "changes": None if changes is None else Jsonb(changes)})
