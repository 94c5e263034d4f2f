"""5. Commands (the seed's status board): Idle / Working / Queued / Disabled / Locked with the last
and next run; enable, disable (one, all), unlock, run now; "safe to stop the service?"."""

from __future__ import annotations

from aiohttp import web

from pgdispatch.dashboard.auth import Can
from pgdispatch.dashboard.views.common import confirm, confirmed, page, row, rows, show, text, user
from pgdispatch.db.errors import InvalidInput

SAFE = ("Disabled", "Idle")


@page("GET", "/commands", Can.READ)
async def commands(request: web.Request) -> web.StreamResponse:
    found = await rows(request, "command_status")
    busy = [c for c in found if c["status"] not in SAFE]
    return show(request, "commands.html", commands=found, busy=busy)


@page("POST", "/commands/switch", Can.ACT)
async def switch(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    key = text(form, "key")  # none: every command (the seed's all-commands switch)
    enable = form.get("enable") == "yes"
    if form.get("enable") not in ("yes", "no"):
        raise InvalidInput("enable: yes or no")
    if key is None and not enable and not confirmed(form):
        return await confirm(
            request,
            what="Disable every command? No new runs start until they are enabled "
            "again; a running one finishes.",
            back=str(request.app.router["commands"].url_for()),
        )
    await row(
        request,
        "switch_command",
        {"key": key, "enable": enable, "who": user(request).who, "reason": text(form, "reason", size=500)},
    )
    raise web.HTTPSeeOther(request.app.router["commands"].url_for())


@page("POST", "/commands/{key}/unlock", Can.ACT)
async def unlock(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    key = request.match_info["key"]
    if not confirmed(form):
        return await confirm(
            request,
            what=f"Give up the stale run of {key}? Its job ends among the dead letters.",
            back=str(request.app.router["commands"].url_for()),
        )
    await row(
        request,
        "unlock_command",
        {"key": key, "who": user(request).who, "reason": text(form, "reason", size=500)},
    )
    raise web.HTTPSeeOther(request.app.router["commands"].url_for())


@page("POST", "/commands/{key}/run", Can.ACT)
async def run(request: web.Request) -> web.StreamResponse:
    key = request.match_info["key"]
    started = await row(request, "run_command", {"key": key, "who": user(request).who})
    if not started or started["job_id"] is None:
        raise InvalidInput(f"command {key} not started: its previous run is still queued or running")
    raise web.HTTPSeeOther(request.app.router["commands"].url_for())
