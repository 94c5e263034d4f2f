"""Kind `lead.deliver` (seed 002): one lead to one integration, through its channel adapter.

The job names a delivery (dispatch.send_lead made it); the lead and the credential are read
when the attempt starts, so a credential changed or disabled meanwhile is honoured. Requests
go through the worker's shared HTTP pool, its allow-list of destinations and the shared limits
(the credential's own: tenant:credential:ID), like every other outbound request.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pgdispatch import sql
from pgdispatch.worker.channels import ADAPTERS, Delivery
from pgdispatch.worker.channels.delivery import CredentialUpdate, NotSent
from pgdispatch.worker.executors.context import ExecutorContext
from pgdispatch.worker.executors.outbound_io import LimitedIO
from pgdispatch.worker.job import Job
from pgdispatch.worker.outcome import Discard, Done, InvalidJob, Outcome

TIMEOUT = 30.0  # seconds for one request; the job's own bound is the queue's (300 s)


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
            return await adapter(delivery, DeliveryIO(self._context, delivery.credential_id))
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
    """ChannelIO for one delivery: limited as its credential (tenant:credential:ID), and its
    row in dispatch.credentials."""

    def __init__(self, context: ExecutorContext, credential_id: int) -> None:
        super().__init__(context, f"credential:{credential_id}", timeout=TIMEOUT)
        self._credential_id = credential_id

    @contextlib.asynccontextmanager
    async def credential_for_update(self) -> AsyncIterator[CredentialUpdate]:
        assert self._context.database is not None
        async with self._context.database() as conn, conn.transaction():
            cur = await conn.execute(sql.query("credential_for_update"), {"id": self._credential_id})
            row = await cur.fetchone()
            if row is None:
                raise NotSent(Discard("discarded", error=f"credential {self._credential_id} was deleted"))
            update = CredentialUpdate(dict(row[0]))
            yield update
            if update.changes:
                await conn.execute(sql.query("merge_credential_settings"),
                                   {"id": self._credential_id, "changes": Jsonb(update.changes)})
