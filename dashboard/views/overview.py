"""1. Overview: queues, charts, workers, breakers and limits; queue and limit controls."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from aiohttp import web
from psycopg.types.json import Jsonb

from pgdispatch.dashboard.auth import Can
from pgdispatch.dashboard.views.common import confirm, confirmed, page, row, rows, show, text, user
from pgdispatch.db.errors import InvalidInput

COUNT_CAP = 1000  # exact counts up to this, estimates beyond

QUEUE_SETTINGS = {  # form field → (the SQL function's key, parse)
    "concurrency": int,
    "max_attempts": int,
    "backoff_base": float,
    "backoff_factor": float,
    "backoff_cap": float,
    "backoff_jitter": float,
    "job_timeout": float,
    "dedupe_window": float,
}
LIMIT_SETTINGS = {
    "rate": float,
    "burst": int,
    "concurrency": int,
    "breaker_failures": int,
    "breaker_cooldown": float,
}


@page("GET", "/", Can.READ_SCOPED)
async def home(request: web.Request) -> web.StreamResponse:
    if not user(request).can(Can.READ):  # an enterprise admin's console is their CRM and leads
        raise web.HTTPFound(request.app.router["crm"].url_for())
    return await overview(request)


@page("GET", "/overview", Can.READ)
async def overview(request: web.Request) -> web.StreamResponse:
    return show(request, "overview.html", **await _figures(request))


async def _figures(request: web.Request) -> dict[str, Any]:
    return {
        "queues": await rows(request, "console_overview_queues", {"cap": COUNT_CAP}),
        "hour": await rows(
            request, "console_throughput", {"span": timedelta(hours=1), "bucket": timedelta(minutes=1)}
        ),
        "day": await rows(
            request, "console_throughput", {"span": timedelta(days=1), "bucket": timedelta(hours=1)}
        ),
        "workers": await rows(request, "console_workers"),
        "limits": await rows(request, "console_limits_in_use"),
        "rules": await rows(request, "console_limit_rules"),
        "cap": COUNT_CAP,
    }


@page("POST", "/queues/{name}/pause", Can.ACT)
async def pause(request: web.Request) -> web.StreamResponse:
    return await _pause(request, True)


@page("POST", "/queues/{name}/resume", Can.ACT)
async def resume(request: web.Request) -> web.StreamResponse:
    return await _pause(request, False)


async def _pause(request: web.Request, paused: bool) -> web.StreamResponse:
    form = await request.post()
    await row(
        request,
        "queue_set_paused",
        {
            "name": request.match_info["name"],
            "paused": paused,
            "who": user(request).who,
            "reason": text(form, "reason"),
        },
    )
    raise web.HTTPSeeOther(request.app.router["overview"].url_for())


@page("POST", "/queues/{name}/settings", Can.ACT)
async def queue_settings(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    changes = _numbers(form, QUEUE_SETTINGS)
    if not changes:
        raise InvalidInput("give at least one setting to change")
    await row(
        request,
        "queue_update",
        {
            "name": request.match_info["name"],
            "changes": Jsonb(changes),
            "who": user(request).who,
            "reason": text(form, "reason"),
        },
    )
    raise web.HTTPSeeOther(request.app.router["overview"].url_for())


@page("POST", "/limits/set", Can.ACT)
async def limit_set(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    key = text(form, "key")
    if key is None:
        raise InvalidInput("key: which limit (host:api.example.com, tenant:acme, ...)")
    changes: dict[str, Any] = _numbers(form, LIMIT_SETTINGS, clear=True)
    if (note := text(form, "note", size=500)) is not None:
        changes["note"] = note
    if not changes:
        raise InvalidInput("give at least one setting (a blank with 'clear' ticked removes it)")
    await row(
        request,
        "limit_set",
        {"key": key, "changes": Jsonb(changes), "who": user(request).who, "reason": text(form, "reason")},
    )
    raise web.HTTPSeeOther(request.app.router["overview"].url_for())


@page("POST", "/limits/reset", Can.ACT)
async def limit_reset(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    key = text(form, "key")
    if key is None:
        raise InvalidInput("key: which limit")
    await row(request, "limit_reset", {"key": key, "who": user(request).who, "reason": text(form, "reason")})
    raise web.HTTPSeeOther(request.app.router["overview"].url_for())


@page("POST", "/limits/delete", Can.ACT)
async def limit_delete(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    key = text(form, "key")
    if key is None:
        raise InvalidInput("key: which limit")
    if not confirmed(form):
        return await confirm(
            request,
            what=f"Delete the limit rule {key}? Its requests go unlimited.",
            back=str(request.app.router["overview"].url_for()),
        )
    await row(request, "limit_delete", {"key": key, "who": user(request).who, "reason": text(form, "reason")})
    raise web.HTTPSeeOther(request.app.router["overview"].url_for())


def _numbers(form: Any, settings: dict[str, type], *, clear: bool = False) -> dict[str, Any]:
    """The numeric settings a form filled in; with `clear`, a ticked clear_NAME removes one."""
    found: dict[str, Any] = {}
    for name, kind in settings.items():
        raw = str(form.get(name, "")).strip()
        if clear and form.get(f"clear_{name}") == "yes":
            found[name] = None
        elif raw:
            try:
                found[name] = kind(raw)
            except ValueError:
                raise InvalidInput(f"{name}: a number, got {raw[:40]!r}") from None
    return found
