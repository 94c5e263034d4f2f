"""6. Leads: batches with their counters, each delivery with its attempts; resend to all or to
named types; credentials (masked) with enable, disable and test. An enterprise admin sees the
leads of their own entities and the credentials that serve them (the SQL filters by that)."""

from __future__ import annotations

from aiohttp import web

from pgdispatch.dashboard.auth import Can
from pgdispatch.dashboard.render import link
from pgdispatch.dashboard.views.common import (
    config_value,
    ids,
    number,
    page,
    paged,
    row,
    rows,
    selected,
    show,
    text,
    user,
)
from pgdispatch.db.errors import InvalidInput, NotFound

TYPES = ("email", "amocrm", "telegram", "bitrix24", "webhooks")


@page("GET", "/leads", Can.READ_SCOPED)
async def leads(request: web.Request) -> web.StreamResponse:
    query = request.query
    scan, size = config_value(request, "scan_limit"), config_value(request, "page_size")
    params = {"before": number(query, "before"), "lead": number(query, "lead"), "scan": scan, "page": size}
    listed = paged(await rows(request, "console_batches", params), key="id", size=size, scan=scan)
    cursor = listed.cursor(["id"], ["lowest"])
    return show(
        request,
        "leads.html",
        batches=listed.rows,
        types=TYPES,
        searched=listed.searched,
        next_link=link(request, before=cursor[0]) if cursor else None,
        filters={"lead": query.get("lead", "")},
    )


@page("GET", "/leads/batches/{id:\\d{1,18}}", Can.READ_SCOPED)
async def batch(request: web.Request) -> web.StreamResponse:
    batch_id = int(request.match_info["id"])
    found = await row(request, "console_batch", {"id": batch_id})
    if found is None:
        raise NotFound(f"no batch {batch_id}")
    return show(
        request,
        "batch.html",
        batch=found,
        types=TYPES,
        deliveries=await rows(request, "console_batch_deliveries", {"id": batch_id}),
        log=await rows(request, "console_batch_log", {"id": batch_id}),
    )


@page("POST", "/leads/resend", Can.ACT_SCOPED)
async def resend(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    lead_ids = ids([p for v in selected(form, "lead") for p in v.replace(",", " ").split()], "lead")
    if not lead_ids:
        raise InvalidInput("give the leads to resend")
    types = [t for t in selected(form, "type") if t]
    unknown = [t for t in types if t not in TYPES]
    if unknown:
        raise InvalidInput(f"unknown integration types: {', '.join(unknown)}")
    done = await row(
        request, "resend_leads", {"lead_ids": lead_ids, "types": types or None, "who": user(request).who}
    )
    assert done is not None
    return show(request, "resent.html", summary=done["summary"])


@page("GET", "/credentials", Can.READ_SCOPED)
async def credentials(request: web.Request) -> web.StreamResponse:
    return show(
        request, "credentials.html", credentials=await rows(request, "console_credentials"), tested=None
    )


@page("POST", "/credentials/{id:\\d{1,18}}/enable", Can.ACT_SCOPED)
async def enable(request: web.Request) -> web.StreamResponse:
    return await _switch(request, True)


@page("POST", "/credentials/{id:\\d{1,18}}/disable", Can.ACT_SCOPED)
async def disable(request: web.Request) -> web.StreamResponse:
    return await _switch(request, False)


async def _switch(request: web.Request, enabled: bool) -> web.StreamResponse:
    form = await request.post()
    changed = await row(
        request,
        "credential_enable",
        {
            "id": int(request.match_info["id"]),
            "enabled": enabled,
            "who": user(request).who,
            "reason": text(form, "reason"),
        },
    )
    if changed is None:
        raise NotFound(f"no credential {request.match_info['id']}")
    raise web.HTTPSeeOther(request.app.router["credentials"].url_for())


@page("POST", "/credentials/{id:\\d{1,18}}/test", Can.ACT_SCOPED)
async def test(request: web.Request) -> web.StreamResponse:
    credential_id = int(request.match_info["id"])
    made = await row(request, "console_test_credential", {"id": credential_id, "who": user(request).who})
    assert made is not None
    raise web.HTTPSeeOther(
        request.app.router["test_result"]
        .url_for(job=str(made["job_id"]))
        .with_query(queue="leads", back=str(request.app.router["credentials"].url_for()))
    )


@page("GET", "/tests/{job:\\d{1,18}}", Can.READ_SCOPED)
async def test_result(request: web.Request) -> web.StreamResponse:
    """A connection test's answer, once a worker has run it (the page refreshes itself meanwhile)."""
    queue = text(request.query, "queue") or "leads"
    found = await row(
        request,
        "console_test_result",
        {"job": int(request.match_info["job"]), "queue": queue, "who": user(request).who},
    )
    if found is None:
        raise NotFound(f"no connection test {request.match_info['job']} of yours")
    back = str(request.query.get("back", "/"))
    back = back if back.startswith("/") and not back.startswith("//") else "/"
    return show(request, "test_result.html", test=found, queue=queue, back=back)
