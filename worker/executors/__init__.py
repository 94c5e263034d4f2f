"""Executors: one async callable per job kind, returning an Outcome."""

from __future__ import annotations

from pgdispatch.worker.attempt import Executor
from pgdispatch.worker.executors import debug
from pgdispatch.worker.executors.connection_test import CredentialTestExecutor, CrmTestExecutor
from pgdispatch.worker.executors.context import ExecutorContext
from pgdispatch.worker.executors.crm_event import CrmEventExecutor
from pgdispatch.worker.executors.http_request import HttpRequestExecutor
from pgdispatch.worker.executors.lead_delivery import LeadDeliveryExecutor


def builtin_executors(context: ExecutorContext, *, debug_kinds: bool = False) -> dict[str, Executor]:
    """Every executor this build knows, by kind, sharing the process's context. The debug.*
    kinds (tests, benchmarks) only when asked for: a production worker never runs them."""
    executors: dict[str, Executor] = {"http.request": HttpRequestExecutor(context)}
    if context.database is not None:
        executors["lead.deliver"] = LeadDeliveryExecutor(context)
        executors["credential.test"] = CredentialTestExecutor(context)
    if context.integrations is not None:
        executors["crm.event"] = CrmEventExecutor(context)
        executors["crm.test"] = CrmTestExecutor(context)
    if debug_kinds:
        executors.update(debug.EXECUTORS)
    return executors
