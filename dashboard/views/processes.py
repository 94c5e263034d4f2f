"""4. Processes (multi-step work): by type and status; an instance with its journal step by step
(messages and payloads masked); restart (from a step), work now, abandon with a reason."""

from __future__ import annotations

from aiohttp import web

from pgdispatch.dashboard.auth import Can
from pgdispatch.dashboard.render import link
from pgdispatch.dashboard.views.common import (
    choice,
    config_value,
    confirm,
    confirmed,
    number,
    page,
    paged,
    row,
    rows,
    show,
    text,
    user,
)
from pgdispatch.db.errors import InvalidInput, NotFound

STATUSES = ("pending", "running", "retry", "error", "done", "abandoned")


@page("GET", "/processes", Can.READ)
async def processes(request: web.Request) -> web.StreamResponse:
    query = request.query
    scan, size = config_value(request, "scan_limit"), config_value(request, "page_size")
    params = {
        "type": text(query, "type"),
        "status": choice(query, "status", STATUSES),
        "before": number(query, "before"),
        "scan": scan,
        "page": size,
    }
    listed = paged(await rows(request, "console_processes", params), key="id", size=size, scan=scan)
    cursor = listed.cursor(["id"], ["lowest"])
    return show(
        request,
        "processes.html",
        processes=listed.rows,
        statuses=STATUSES,
        searched=listed.searched,
        types=await rows(request, "console_process_types"),
        next_link=link(request, before=cursor[0]) if cursor else None,
        filters={k: query.get(k, "") for k in ("type", "status")},
    )


@page("GET", "/processes/{id:\\d{1,18}}", Can.READ)
async def process(request: web.Request) -> web.StreamResponse:
    process_id = int(request.match_info["id"])
    found = await row(request, "console_process", {"id": process_id})
    if found is None:
        raise NotFound(f"no process {process_id}")
    return show(
        request,
        "process.html",
        process=found,
        journal=await rows(request, "console_process_journal", {"id": process_id}),
    )


@page("POST", "/processes/{id:\\d{1,18}}/restart", Can.ACT)
async def restart(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    process_id = int(request.match_info["id"])
    await row(
        request,
        "process_restart",
        {
            "id": process_id,
            "from_step": text(form, "from_step"),
            "who": user(request).who,
            "reason": text(form, "reason", size=500),
        },
    )
    raise web.HTTPSeeOther(request.app.router["process"].url_for(id=str(process_id)))


@page("POST", "/processes/{id:\\d{1,18}}/work", Can.ACT)
async def work(request: web.Request) -> web.StreamResponse:
    process_id = int(request.match_info["id"])
    await row(request, "process_work", {"id": process_id, "who": user(request).who})
    raise web.HTTPSeeOther(request.app.router["process"].url_for(id=str(process_id)))


@page("POST", "/processes/{id:\\d{1,18}}/abandon", Can.ACT)
async def abandon(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    process_id = int(request.match_info["id"])
    reason = text(form, "reason", size=500)
    if reason is None:
        raise InvalidInput("abandon: say why (the reason is kept in the journal and the audit log)")
    if not confirmed(form):
        return await confirm(
            request,
            what=f"Abandon process {process_id}? It will not run again.",
            back=str(request.app.router["process"].url_for(id=str(process_id))),
        )
    await row(request, "process_abandon", {"id": process_id, "who": user(request).who, "reason": reason})
    raise web.HTTPSeeOther(request.app.router["process"].url_for(id=str(process_id)))
