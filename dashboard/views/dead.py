"""3. Dead letters: by queue, kind, reason and time; retry (with a new expiry where needed) or
purge one, a selection, or everything the filter matches; the result names what was skipped."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from pgdispatch.dashboard.auth import Can
from pgdispatch.dashboard.render import link
from pgdispatch.dashboard.views.common import (
    Bulk,
    back_to,
    choice,
    config_value,
    confirm,
    confirmed,
    everything,
    ids,
    moment,
    number,
    page,
    paged,
    result,
    rows,
    selected,
    show,
    text,
    user,
)
from pgdispatch.db.errors import InvalidInput

REASONS = ("exhausted", "expired", "discarded", "invalid", "stop_code", "cancelled")


def _filters(query: Any) -> dict[str, Any]:
    since, until = moment(query, "since"), moment(query, "until")
    if since and until and since >= until:
        raise InvalidInput("since must be before until")
    return {
        "queue": text(query, "queue"),
        "kind": text(query, "kind"),
        "reason": choice(query, "reason", REASONS),
        "since": since,
        "until": until,
    }


@page("GET", "/dead", Can.READ)
async def dead(request: web.Request) -> web.StreamResponse:
    query = request.query
    filters = _filters(query)
    before_at, before_id = moment(query, "before_at"), number(query, "before_id")
    scan, size = config_value(request, "scan_limit"), config_value(request, "page_size")
    params = {**filters, "before_at": before_at, "before_id": before_id, "scan": scan, "page": size}
    listed = paged(await rows(request, "console_dead", params), key="job_id", size=size, scan=scan)
    cursor = listed.cursor(["died_at", "job_id"], ["lowest_at", "lowest_id"])
    next_link = link(request, before_at=cursor[0].isoformat(), before_id=cursor[1]) if cursor else None
    return show(
        request,
        "dead.html",
        dead=listed.rows,
        reasons=REASONS,
        searched=listed.searched,
        next_link=next_link,
        filters={k: query.get(k, "") for k in ("queue", "kind", "reason", "since", "until")},
    )


@page("POST", "/dead/retry", Can.ACT)
async def retry(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    expire_in = text(form, "expire_in_hours")
    expire_at = None
    if expire_in is not None:
        try:
            hours = float(expire_in)
        except ValueError:
            raise InvalidInput(f"expire_in_hours: a number of hours, got {expire_in[:20]!r}") from None
        if hours <= 0:
            raise InvalidInput("expire_in_hours: more than 0")
        expire_at = datetime.now(UTC) + timedelta(hours=hours)
    bulk = Bulk("retried")

    async def act(chunk: list[int]) -> None:
        bulk.add(
            await rows(
                request,
                "dead_retry",
                {
                    "job_ids": chunk,
                    "expire_at": expire_at,
                    "who": user(request).who,
                    "reason": text(form, "reason"),
                },
            ),
            flag="revived",
            why="reason",
        )

    await _apply(request, form, bulk, act)
    return result(request, bulk, back=back_to(request, form, "dead"))


@page("POST", "/dead/purge", Can.ACT)
async def purge(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    if not confirmed(form):
        return await confirm(
            request,
            what="Purge these dead letters? They are deleted for good.",
            back=back_to(request, form, "dead"),
        )
    bulk = Bulk("purged")

    async def act(chunk: list[int]) -> None:
        bulk.add(
            await rows(
                request,
                "dead_purge",
                {"job_ids": chunk, "who": user(request).who, "reason": text(form, "reason")},
            ),
            flag="purged",
            why="reason",
        )

    await _apply(request, form, bulk, act)
    return result(request, bulk, back=back_to(request, form, "dead"))


async def _apply(request: web.Request, form: Any, bulk: Bulk, act: Any) -> None:
    if form.get("scope") == "filter":
        filters = _filters(form)

        async def next_chunk(cursor: Any) -> tuple[list[int], Any]:
            after_at, after_id = cursor if cursor else (None, None)
            found = await rows(
                request,
                "dead_ids",
                {
                    **filters,
                    "older_than_seconds": None,
                    "limit": 1000,
                    "after_at": after_at,
                    "after_id": after_id,
                },
            )
            chunk = [r["job_id"] for r in found]
            return chunk, ((found[-1]["died_at"], found[-1]["job_id"]) if found else None)

        await everything(request, bulk, next_chunk, act)
        return
    chosen = ids(selected(form))
    if not chosen:
        raise InvalidInput("select at least one dead letter (or act on everything the filter matches)")
    await act(chosen)
