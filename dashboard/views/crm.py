"""7. CRM integrations, per enterprise (seed 004's /retailcrm-admin/): Connection (domain, API key:
replaced, never shown), Settings (client id, which events are sent, user_mappings as a table),
Logs (recent successes and errors), Test connection, the breaker. An enterprise admin sees and
changes their own enterprises only: the SQL says so (dispatch.console_sees_enterprise)."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web
from psycopg.types.json import Jsonb

from pgdispatch.dashboard.auth import Can
from pgdispatch.dashboard.views.common import (
    config_value,
    moment,
    page,
    row,
    rows,
    selected,
    show,
    text,
    user,
)
from pgdispatch.db.errors import InvalidInput, NotFound

EVENTS = ("dial", "bridge", "hangup", "download")
INTEGRATIONS = ("retailcrm", "webhook")
TABS = ("connection", "settings", "logs", "test")


@page("GET", "/crm", Can.READ_SCOPED)
async def crm(request: web.Request) -> web.StreamResponse:
    size = config_value(request, "page_size")
    found = await rows(request, "console_enterprises", {"after": text(request.query, "after"), "page": size})
    return show(
        request, "crm.html", enterprises=found, more=found[-1]["number"] if len(found) == size else None
    )


@page("GET", "/crm/{number}", Can.READ_SCOPED)
async def enterprise(request: web.Request) -> web.StreamResponse:
    number = request.match_info["number"]
    found = await row(request, "console_enterprise", {"number": number})
    if found is None:  # no such enterprise, or not one of this admin's: the same answer
        raise NotFound(f"no enterprise {number}")
    tab = request.query.get("tab", "connection")
    tab = tab if tab in TABS else "connection"
    context: dict[str, Any] = {}
    if tab == "logs":
        outcome = request.query.get("outcome") or None
        if outcome not in (None, "ok", "error"):
            raise InvalidInput("outcome: ok or error")
        context["logs"] = await rows(
            request,
            "console_crm_logs",
            {
                "number": number,
                "before": moment(request.query, "before"),
                "outcome": outcome,
                "scan": 500,
                "page": config_value(request, "page_size"),
            },
        )
        context["outcome"] = outcome or ""
    return show(
        request,
        "enterprise.html",
        enterprise=found,
        tab=tab,
        tabs=TABS,
        events=EVENTS,
        integrations=INTEGRATIONS,
        crm_status=await rows(request, "console_enterprise_status", {"number": number}),
        **context,
    )


@page("POST", "/crm/{number}/{integration}/connection", Can.ACT_SCOPED)
async def connection(request: web.Request) -> web.StreamResponse:
    """The address and, when one is typed, a new API key (the stored one is never shown)."""
    form = await request.post()
    integration = _integration(request)
    changes: dict[str, Any] = {}
    address_field = "api_url" if integration == "retailcrm" else "url"
    if (address := text(form, address_field, size=2000)) is not None:
        changes[address_field] = address
    secret_field = "api_key" if integration == "retailcrm" else "secret"
    if (secret := text(form, secret_field, size=2000)) is not None:
        changes[secret_field] = secret
    if form.get("enabled") in ("yes", "no"):
        changes["enabled"] = form.get("enabled") == "yes"
    return await _save(request, integration, changes, tab="connection")


@page("POST", "/crm/{number}/{integration}/settings", Can.ACT_SCOPED)
async def settings(request: web.Request) -> web.StreamResponse:
    """Client id, the events sent, and user_mappings (extension → CRM user id) as table rows."""
    form = await request.post()
    integration = _integration(request)
    changes: dict[str, Any] = {"events": {event: form.get(f"event_{event}") == "yes" for event in EVENTS}}
    if integration == "retailcrm":
        changes["client_id"] = text(form, "client_id")  # blank: removed
        mappings: dict[str, int] = {}
        for extension, user_id in zip(selected(form, "extension"), selected(form, "crm_user"), strict=False):
            extension, user_id = extension.strip(), user_id.strip()
            if not extension and not user_id:
                continue  # an empty row of the table
            if not re.fullmatch(r"[0-9A-Za-z*#+]{1,32}", extension):
                raise InvalidInput(f"extension {extension[:40]!r}: digits (or *, #, +), up to 32")
            if not re.fullmatch(r"\d{1,12}", user_id):
                raise InvalidInput(
                    f"extension {extension}: the CRM user id is a number, got {user_id[:40]!r}"
                )
            if extension in mappings:
                raise InvalidInput(f"extension {extension} is mapped twice")
            mappings[extension] = int(user_id)
        changes["user_mappings"] = mappings
    return await _save(request, integration, changes, tab="settings")


@page("POST", "/crm/{number}/{integration}/test", Can.ACT_SCOPED)
async def test(request: web.Request) -> web.StreamResponse:
    number, integration = request.match_info["number"], _integration(request)
    made = await row(
        request,
        "console_test_integration",
        {"number": number, "integration": integration, "who": user(request).who},
    )
    assert made is not None
    back = str(request.app.router["enterprise"].url_for(number=number).with_query(tab="test"))
    raise web.HTTPSeeOther(
        request.app.router["test_result"].url_for(job=str(made["job_id"])).with_query(queue="crm", back=back)
    )


@page("POST", "/crm/{number}/{integration}/breaker", Can.ACT_SCOPED)
async def breaker(request: web.Request) -> web.StreamResponse:
    """Close the CRM's breaker and lift its pause (its shared limit's state)."""
    number, integration = request.match_info["number"], _integration(request)
    found = await row(request, "console_enterprise", {"number": number})
    if found is None:
        raise NotFound(f"no enterprise {number}")
    await row(
        request, "console_crm_reset", {"number": number, "integration": integration, "who": user(request).who}
    )
    raise web.HTTPSeeOther(request.app.router["enterprise"].url_for(number=number))


def _integration(request: web.Request) -> str:
    integration = request.match_info["integration"]
    if integration not in INTEGRATIONS:
        raise NotFound(f"no integration {integration!r} (known: {', '.join(INTEGRATIONS)})")
    return integration


async def _save(
    request: web.Request, integration: str, changes: dict[str, Any], *, tab: str
) -> web.StreamResponse:
    number = request.match_info["number"]
    if not changes:
        raise InvalidInput("nothing to change")
    await row(
        request,
        "enterprise_integration_set",
        {
            "number": number,
            "integration": integration,
            "changes": Jsonb(changes),
            "who": user(request).who,
            "reason": None,
            "name": None,
        },
    )
    raise web.HTTPSeeOther(request.app.router["enterprise"].url_for(number=number).with_query(tab=tab))
