"""2. Jobs: live jobs by queue, kind, state, tenant or a value in args; by id or idempotency key.
A job with every attempt; cancel and run now, for a selection or everything a filter matches."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from psycopg.types.json import Jsonb

from pgdispatch.dashboard.auth import Can
from pgdispatch.dashboard.render import link
from pgdispatch.dashboard.views.common import (
    Bulk,
    args_filter,
    back_to,
    choice,
    config_value,
    confirm,
    confirmed,
    everything,
    ids,
    number,
    page,
    paged,
    result,
    row,
    rows,
    selected,
    show,
    text,
    user,
)
from pgdispatch.db.errors import InvalidInput, NotFound

STATES = ("available", "scheduled", "running", "parked")


def _filters(query: Any) -> dict[str, Any]:
    args = args_filter(query)
    return {
        "queue": text(query, "queue"),
        "kind": text(query, "kind"),
        "tenant": text(query, "tenant"),
        "state": choice(query, "state", STATES),
        "args": Jsonb(args) if args is not None else None,
    }


@page("GET", "/jobs", Can.READ)
async def jobs(request: web.Request) -> web.StreamResponse:
    query = request.query
    wanted = number(query, "id")
    if wanted is not None:  # straight to the job, live or dead
        raise web.HTTPFound(request.app.router["job"].url_for(id=str(wanted)))
    if (key := text(query, "key")) is not None:
        found = await rows(request, "console_job_by_key", {"key": key})
        if len(found) == 1:
            raise web.HTTPFound(request.app.router["job"].url_for(id=str(found[0]["id"])))
        if not found:
            raise NotFound(
                f"no live job, nor a finished one still remembered, has the idempotency key {key!r}"
            )
    filters = _filters(query)
    scan, size = config_value(request, "scan_limit"), config_value(request, "page_size")
    params = {**filters, "before": number(query, "before"), "scan": scan, "page": size}
    listed = paged(await rows(request, "console_jobs", params), key="id", size=size, scan=scan)
    cursor = listed.cursor(["id"], ["lowest"])
    return show(
        request,
        "jobs.html",
        jobs=listed.rows,
        next_link=link(request, before=cursor[0]) if cursor else None,
        searched=listed.searched,
        states=STATES,
        filters={k: query.get(k, "") for k in ("queue", "kind", "tenant", "state", "args")},
    )


@page("GET", "/jobs/{id:\\d{1,18}}", Can.READ)
async def job(request: web.Request) -> web.StreamResponse:
    job_id = int(request.match_info["id"])
    live = await row(request, "console_job", {"id": job_id})
    dead = None if live else await row(request, "console_dead_job", {"id": job_id})
    attempts = await rows(request, "console_job_attempts", {"id": job_id})
    if live is None and dead is None and not attempts:
        raise NotFound(f"no job {job_id} (it may have finished and its history been pruned)")
    return show(request, "job.html", job_id=job_id, live=live, dead=dead, attempts=attempts)


@page("POST", "/jobs/cancel", Can.ACT)
async def cancel(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    reason = text(form, "reason", size=500)
    if not confirmed(form):
        return await confirm(
            request,
            what="Cancel these jobs? Each ends among the dead letters as cancelled; "
            "a running one is stopped by its worker.",
            back=back_to(request, form, "jobs"),
        )
    bulk = Bulk("cancelled")

    async def act(chunk: list[int]) -> None:
        bulk.add(
            await rows(
                request, "console_cancel_jobs", {"ids": chunk, "reason": reason, "who": user(request).who}
            )
        )

    await _apply(request, form, bulk, act)
    return result(request, bulk, back=back_to(request, form, "jobs"))


@page("POST", "/jobs/run-now", Can.ACT)
async def run_now(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    bulk = Bulk("run now")

    async def act(chunk: list[int]) -> None:
        bulk.add(await rows(request, "console_run_jobs_now", {"ids": chunk, "who": user(request).who}))

    await _apply(request, form, bulk, act)
    return result(request, bulk, back=back_to(request, form, "jobs"))


async def _apply(request: web.Request, form: Any, bulk: Bulk, act: Any) -> None:
    """A selection (id checkboxes), or everything the filter (the form's filter fields) matches."""
    if form.get("scope") == "filter":
        filters = _filters(form)

        async def next_chunk(cursor: Any) -> tuple[list[int], Any]:
            found = await rows(request, "console_job_ids", {**filters, "before": cursor, "limit": 1000})
            chunk = [r["id"] for r in found]
            return chunk, (chunk[-1] if chunk else None)

        await everything(request, bulk, next_chunk, act)
        return
    chosen = ids(selected(form))
    if not chosen:
        raise InvalidInput("select at least one job (or act on everything the filter matches)")
    await act(chosen)
