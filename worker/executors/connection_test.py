"""Kinds `credential.test` and `crm.test`: a connection test asked for in the console.

The console holds no secrets and has no say over where a worker may connect, so its "Test
connection" is a job (dispatch.test_credential_v1, dispatch.test_integration_v1) that a worker
runs with the credential it holds, under its destination policy and the shared limits: the job
completes with what the vendor said (detail.result), or dies with what is wrong (its error). One
attempt: a test is asked again by pressing the button again.
"""

from __future__ import annotations

from typing import Any

from psycopg.rows import dict_row

from pgdispatch import sql
from pgdispatch.worker.channels import CHECKS, CRM_CHECKS, CheckFailed
from pgdispatch.worker.channels.delivery import NotSent
from pgdispatch.worker.executors.context import ExecutorContext
from pgdispatch.worker.executors.crm_event import TIMEOUT, crm_tenant
from pgdispatch.worker.executors.lead_delivery import DeliveryIO
from pgdispatch.worker.executors.outbound_io import LimitedIO
from pgdispatch.worker.job import Job
from pgdispatch.worker.outcome import Discard, Done, InvalidJob, Outcome


def _failed(exc: CheckFailed | NotSent) -> Outcome:
    if isinstance(exc, NotSent) and not isinstance(exc.outcome, Discard):
        # Not sent for a limit or a timeout: still an answer to the operator, not a retry.
        return Discard("discarded", error=f"not tested: {' '.join(str(exc).split())}")
    return Discard("discarded", error=" ".join(str(exc).split()))  # an HTML page: one line of it


class CredentialTestExecutor:
    def __init__(self, context: ExecutorContext) -> None:
        self._context = context

    async def __call__(self, job: Job) -> Outcome:
        credential_id = job.args.get("credential_id")
        if not isinstance(credential_id, int):
            raise InvalidJob(f"credential_id must be an integer, got {credential_id!r}")
        credential = await self._load(credential_id)
        if credential is None:
            return Discard("discarded", error=f"credential {credential_id} was deleted")
        check = CHECKS.get(credential["type"])
        if check is None:
            return Discard("discarded", error=f"pgdispatch does not deliver to {credential['type']}: "
                                              "nothing to test")
        try:
            verdict = await check(credential["settings"], DeliveryIO(self._context, credential_id,
                                                                     list(credential["limit_scopes"] or [])))
        except (CheckFailed, NotSent) as exc:
            return _failed(exc)
        return Done(detail={"result": f"ok, {verdict}"})

    async def _load(self, credential_id: int) -> dict[str, Any] | None:
        assert self._context.database is not None
        async with self._context.database() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(sql.query("credential_get"), {"id": credential_id})
            return await cur.fetchone()


class CrmTestExecutor:
    def __init__(self, context: ExecutorContext) -> None:
        if context.integrations is None:
            raise RuntimeError("crm.test needs the integration config cache")
        self._context = context
        self._configs = context.integrations

    async def __call__(self, job: Job) -> Outcome:
        enterprise, integration = job.args.get("enterprise"), job.args.get("integration")
        if not isinstance(enterprise, str) or not isinstance(integration, str):
            raise InvalidJob("enterprise and integration must be strings")
        config = await self._configs.get(enterprise)
        crm = None if config is None else config.integrations.get(integration)
        if crm is None:
            return Discard("discarded", error=f"enterprise {enterprise} has no {integration} config")
        check = CRM_CHECKS.get(integration)
        if check is None:
            return Discard("discarded", error=f"no adapter for {integration} in this build")
        try:
            verdict = await check(crm.settings, LimitedIO(self._context, crm_tenant(enterprise, integration),
                                                          timeout=TIMEOUT))
        except (CheckFailed, NotSent) as exc:
            return _failed(exc)
        return Done(detail={"result": f"ok, {verdict}"})
