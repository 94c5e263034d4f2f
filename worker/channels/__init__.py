"""Channel adapters (seeds 002 and 004): each speaks one vendor's API and maps its answers to
outcomes.

A lead adapter gets a Delivery (the lead, the credential's settings), a CRM adapter a CallEvent
(the event, the CRM's settings), and both the worker's outbound machinery; each returns Done,
Retry or Discard with what it sent and what it got back (kept, masked, in
dispatch.integration_logs). Only the engine writes job state; a lead delivery and its batch are
settled from the engine's records by triggers (sql/migrations/0011_leads.sql).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from pgdispatch.worker.channels.amocrm import check_amocrm, send_amocrm
from pgdispatch.worker.channels.bitrix24 import check_bitrix24, send_bitrix24
from pgdispatch.worker.channels.calls import CallEvent
from pgdispatch.worker.channels.delivery import ChannelIO, CheckFailed, Delivery, Outbound
from pgdispatch.worker.channels.email import check_email, send_email
from pgdispatch.worker.channels.retailcrm import check_retailcrm, send_retailcrm
from pgdispatch.worker.channels.telegram import check_telegram, send_telegram
from pgdispatch.worker.channels.webhooks import check_webhook, send_call_webhook, send_webhook
from pgdispatch.worker.outcome import Outcome

Adapter = Callable[[Delivery, ChannelIO], Awaitable[Outcome]]

ADAPTERS: Mapping[str, Adapter] = {
    "webhooks": send_webhook,
    "telegram": send_telegram,
    "bitrix24": send_bitrix24,
    "amocrm": send_amocrm,
    "email": send_email,
}

# `pgdispatch credentials test`: a real call that says what is wrong, sending nothing to anyone.
Check = Callable[[Mapping[str, Any], ChannelIO], Awaitable[str]]

CHECKS: Mapping[str, Check] = {
    "webhooks": check_webhook,
    "telegram": check_telegram,
    "bitrix24": check_bitrix24,
    "amocrm": check_amocrm,
    "email": check_email,
}

# Call events (seed 004): one adapter per CRM of dispatch.crm_integrations(), and its check
# (`pgdispatch crm config test`).
CrmAdapter = Callable[[CallEvent, Outbound], Awaitable[Outcome]]
CrmCheck = Callable[[Mapping[str, Any], Outbound], Awaitable[str]]

CRM_ADAPTERS: Mapping[str, CrmAdapter] = {
    "retailcrm": send_retailcrm,
    "webhook": send_call_webhook,
}

CRM_CHECKS: Mapping[str, CrmCheck] = {
    "retailcrm": check_retailcrm,
    "webhook": check_webhook,
}

__all__ = ["ADAPTERS", "CHECKS", "CRM_ADAPTERS", "CRM_CHECKS", "Adapter", "CallEvent", "ChannelIO", "Check",
           "CheckFailed", "CrmAdapter", "CrmCheck", "Delivery", "Outbound"]
