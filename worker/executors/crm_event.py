"""Kind `crm.event` (seed 004): one call event to one CRM of an enterprise.

dispatch.call_event made the job; the CRM's settings are read from the process's integration
config cache when the attempt starts (a dictionary lookup when cached; NOTIFY keeps it fresh),
so a CRM disabled or reconfigured meanwhile is honoured. Requests go through the worker's one
HTTP pool and the shared limits of the enterprise's CRM, tenant key
`enterprise:NUMBER:CRM`: its rate limit and concurrency cap across every worker and host, and,
with the CRM's host, its circuit breaker.
"""

from __future__ import annotations

from pgdispatch import sql
from pgdispatch.worker.channels import CRM_ADAPTERS, CallEvent
from pgdispatch.worker.channels.calls import EVENTS
from pgdispatch.worker.channels.delivery import NotSent
from pgdispatch.worker.executors.context import ExecutorContext
from pgdispatch.worker.executors.outbound_io import LimitedIO
from pgdispatch.worker.job import Job
from pgdispatch.worker.outcome import Discard, InvalidJob, Outcome, Retry

TIMEOUT = 3.0  # seconds for one CRM request (the seed: 2-3 s); the queue bounds the job (10 s)


def crm_tenant(enterprise: str, integration: str) -> str:
    """The shared-limits tenant of an enterprise's CRM (dispatch.crm_limit_key without 'tenant:')."""
    return f"enterprise:{enterprise}:{integration}"


class CrmEventExecutor:
    def __init__(self, context: ExecutorContext) -> None:
        if context.integrations is None:
            raise RuntimeError("crm.event needs the integration config cache")
        self._context = context
        self._configs = context.integrations

    async def __call__(self, job: Job) -> Outcome:
        args = job.args
        enterprise, integration, call_unique_id = (_text(args, name) for name in
                                                   ("enterprise", "integration", "call_unique_id"))
        event, payload = args.get("event"), args.get("payload")
        if event not in EVENTS:
            raise InvalidJob(f"event must be one of {', '.join(EVENTS)}, got {event!r}")
        if not isinstance(payload, dict):
            raise InvalidJob("payload must be a JSON object")
        config = await self._configs.get(enterprise)
        if config is None:
            return Discard("discarded", error=f"enterprise {enterprise} no longer exists")
        crm = config.integrations.get(integration)
        if crm is None or not crm.enabled:
            return Discard("discarded", error=f"{integration} is not enabled for enterprise {enterprise}")
        events = crm.settings.get("events")
        if isinstance(events, dict) and events.get(event) is False:  # switched off after it was queued
            return Discard("discarded", error=f"{integration} of enterprise {enterprise} no longer sends "
                                              f"{event} events (its events.{event} is false)")
        adapter = CRM_ADAPTERS.get(integration)
        if adapter is None:
            return Discard("discarded", error=f"no adapter for {integration} in this build")
        key = {"call": call_unique_id, "event": event, "integration": integration}
        # An earlier attempt may have got part of the event through (a hangup: its event, not
        # its upload): those requests are not sent again. Read on retries only.
        delivered = frozenset(await self._delivered(key)) if job.attempt > 1 else frozenset()
        call = CallEvent(enterprise=enterprise, integration=integration, event=event,
                         call_unique_id=call_unique_id, payload=payload, sent_at=job.created_at,
                         settings=crm.settings, delivered=delivered)
        try:
            outcome = await adapter(call, LimitedIO(self._context, crm_tenant(enterprise, integration),
                                                    timeout=TIMEOUT))
        except NotSent as not_sent:
            return not_sent.outcome
        got_through = (outcome.detail or {}).get("delivered") if isinstance(outcome, Retry) else None
        if got_through and set(got_through) != delivered:
            await self._remember(key, list(got_through))
        return outcome

    async def _delivered(self, key: dict[str, str]) -> list[str]:
        assert self._context.database is not None
        async with self._context.database() as conn:
            row = await (await conn.execute(sql.query("call_event_delivered"), key)).fetchone()
        return list(row[0]) if row else []

    async def _remember(self, key: dict[str, str], delivered: list[str]) -> None:
        assert self._context.database is not None
        async with self._context.database() as conn:
            await conn.execute(sql.query("call_event_mark_delivered"), {**key, "delivered": delivered})


def _text(args: dict[str, object], name: str) -> str:
    value = args.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidJob(f"{name} must be a non-empty string, got {value!r}")
    return value
