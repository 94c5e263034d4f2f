"""8. Audit: every operator action (console and CLI), by whom, when, why."""

from __future__ import annotations

from aiohttp import web

from pgdispatch.dashboard.auth import Can
from pgdispatch.dashboard.render import link
from pgdispatch.dashboard.views.common import config_value, moment, number, page, paged, rows, show, text


@page("GET", "/audit", Can.READ)
async def audit(request: web.Request) -> web.StreamResponse:
    query = request.query
    scan, size = config_value(request, "scan_limit"), config_value(request, "page_size")
    params = {
        "who": text(query, "who"),
        "action": text(query, "action"),
        "target": text(query, "target"),
        "before_at": moment(query, "before_at"),
        "before_id": number(query, "before_id"),
        "scan": scan,
        "page": size,
    }
    listed = paged(await rows(request, "console_audit", params), key="id", size=size, scan=scan)
    cursor = listed.cursor(["at", "id"], ["lowest_at", "lowest_id"])
    next_link = link(request, before_at=cursor[0].isoformat(), before_id=cursor[1]) if cursor else None
    return show(
        request,
        "audit.html",
        entries=listed.rows,
        searched=listed.searched,
        next_link=next_link,
        filters={k: query.get(k, "") for k in ("who", "action", "target")},
    )
