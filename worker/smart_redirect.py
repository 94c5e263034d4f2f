"""Smart redirect (seed 004): who in the CRM is responsible for this caller, as the internal
extension to put the call through to; served on the pool's HTTP port.

The telephony side waits for the answer while the caller rings, so it has a hard budget (2 s):
past it, or on any error, the answer is "no redirect" with the reason, never an error page. The
enterprise's config comes from the in-process cache (NOTIFY keeps it fresh; only a first miss
reads the database, once). The CRM is asked through the same shared limits as the call events
(the enterprise's rate limit and circuit breaker), so an open breaker answers at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pgdispatch.notify import CONFIG_CHANNEL
from pgdispatch.notify.integrations import IntegrationConfigs
from pgdispatch.notify.listener import Listener
from pgdispatch.worker.channels import CheckFailed
from pgdispatch.worker.channels.delivery import NotSent
from pgdispatch.worker.channels.retailcrm import responsible_manager
from pgdispatch.worker.config import WorkerConfig
from pgdispatch.worker.executors.context import ExecutorContext, executor_context, on_config_change
from pgdispatch.worker.executors.crm_event import crm_tenant
from pgdispatch.worker.executors.outbound_io import LimitedIO
from pgdispatch.worker.outbound.destinations import Destinations
from pgdispatch.worker.services import supervised

log = logging.getLogger(__name__)

BUDGET = 2.0  # seconds, everything included
PHONE = re.compile(r"^\+?[0-9]{3,20}$")


@dataclass(slots=True)
class RedirectCounters:
    asked: int = 0
    redirected: int = 0
    not_redirected: int = 0
    over_budget: int = 0


class BadRequest(Exception):
    """The request itself is wrong (400): the telephony side is misconfigured."""


class SmartRedirect:
    def __init__(self, configs: IntegrationConfigs, context: ExecutorContext, *,
                 budget: float = BUDGET) -> None:
        self.configs = configs
        self._context = context
        self._budget = budget
        self.counters = RedirectCounters()

    async def answer(self, enterprise: str | None, phone: str | None) -> dict[str, Any]:
        """{"redirect": true, "extension": ...} or {"redirect": false, "reason": ...}; raises
        BadRequest when `enterprise` or `phone` is missing or malformed."""
        if not enterprise:
            raise BadRequest("enterprise is required (?enterprise=NUMBER&phone=NUMBER)")
        if not phone or not PHONE.match(phone):
            raise BadRequest(f"phone must be 3-20 digits, optionally after +, got {phone!r}")
        self.counters.asked += 1
        began = time.perf_counter()
        try:
            async with asyncio.timeout(self._budget):
                extension, detail = await self._ask(enterprise, phone)
            answer: dict[str, Any] = {"redirect": True, "extension": extension, **detail}
            self.counters.redirected += 1
        except TimeoutError:
            self.counters.over_budget += 1
            answer = {"redirect": False, "reason": f"no answer from the CRM within {self._budget:g}s"}
        except (NoRedirect, CheckFailed, NotSent) as why:
            answer = {"redirect": False, "reason": str(why)}
        except Exception as exc:  # the caller is ringing: an answer, whatever broke
            log.exception("smart redirect for enterprise %s failed", enterprise)
            answer = {"redirect": False, "reason": f"internal error: {type(exc).__name__}"}
        if not answer["redirect"]:
            self.counters.not_redirected += 1
        answer["took_ms"] = round((time.perf_counter() - began) * 1000, 1)
        return answer

    def stats(self) -> dict[str, Any]:
        return {**asdict(self.counters), "config_cache": self.configs.stats()}

    async def _ask(self, enterprise: str, phone: str) -> tuple[str, dict[str, Any]]:
        config = await self.configs.get(enterprise)  # a dict lookup unless never read or just changed
        if config is None:
            raise NoRedirect(f"no enterprise {enterprise}")
        crm = config.integrations.get("retailcrm")
        if crm is None or not crm.enabled:
            raise NoRedirect(f"retailcrm is not enabled for enterprise {enterprise}")
        io = LimitedIO(self._context, crm_tenant(enterprise, "retailcrm"), timeout=self._budget)
        manager = await responsible_manager(crm.settings, io, phone)
        extension = extension_of(crm.settings, manager)
        if extension is None:
            raise NoRedirect(f"manager {manager.get('id')} has no extension in user_mappings "
                             "and no code in RetailCRM")
        name = " ".join(str(manager[k]) for k in ("firstName", "lastName") if manager.get(k))
        return extension, {"manager_id": manager.get("id"), "manager": name or None}


class NoRedirect(Exception):
    """Why this call is not redirected (the answer's reason)."""


def extension_of(settings: Mapping[str, Any], manager: Mapping[str, Any]) -> str | None:
    """The manager's extension: from user_mappings (extension -> CRM user id) first, else the
    code RetailCRM has for them."""
    for extension, user_id in (settings.get("user_mappings") or {}).items():
        if user_id == manager.get("id"):
            return str(extension)
    code = manager.get("code")
    return str(code) if code not in (None, "") else None


@contextlib.asynccontextmanager
async def smart_redirect_service(config: WorkerConfig) -> AsyncIterator[SmartRedirect]:
    """What the pool's HTTP port needs to answer smart redirects: the outbound context (with its
    config cache) and a LISTEN connection of its own feeding it."""
    destinations = Destinations(allow_private=config.allow_private_networks,
                                allowed=config.allowed_destinations)
    async with executor_context(config.database_url, destinations=destinations, max_connections=50,
                                breaker_failures=config.breaker_failures,
                                breaker_cooldown=config.breaker_cooldown,
                                slot_lease=config.lease_seconds, settings=config.connections) as context:
        configs = context.integrations
        assert configs is not None

        def on_notify(channel: str, payload: str) -> None:
            on_config_change(context, payload)

        async def on_reconnect() -> None:
            on_config_change(context, None)

        listener = Listener(config.listen_url or config.database_url, [CONFIG_CHANNEL],
                            on_notify=on_notify, on_reconnect=on_reconnect, settings=config.connections)

        async def warm() -> None:  # LISTEN first, then read: no change can fall in between
            await listener.connected.wait()
            await configs.reload_all()

        tasks = [asyncio.create_task(supervised("smart-redirect listener", listener.run)),
                 asyncio.create_task(supervised("integration config warm-up", warm)),
                 asyncio.create_task(supervised("integration config reload", configs.reload_forever))]
        try:
            yield SmartRedirect(configs, context)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
