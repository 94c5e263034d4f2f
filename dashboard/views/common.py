"""What every page shares: its route and who may open it, the console user's transaction, the
parsing of filters and forms, confirmations and bulk actions that say what they skipped."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from multidict import MultiDictProxy

from pgdispatch.dashboard.auth import USER, Can, User
from pgdispatch.dashboard.config import CONFIG
from pgdispatch.dashboard.database import DATABASE, ConsoleDatabase, Row
from pgdispatch.dashboard.render import RENDERER, Renderer
from pgdispatch.db.errors import InvalidInput
from pgdispatch.db.masking import SECRET_KEY

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    can: Can


ROUTES: list[Route] = []


def page(method: str, path: str, can: Can) -> Callable[[Handler], Handler]:
    """Register a page or an action and the capability it needs (checked for every request,
    before the handler runs)."""

    def register(handler: Handler) -> Handler:
        ROUTES.append(Route(method, path, handler, can))
        return handler

    return register


def user(request: web.Request) -> User:
    return request[USER]


def database(request: web.Request) -> ConsoleDatabase:
    return request.app[DATABASE]


def renderer(request: web.Request) -> Renderer:
    return request.app[RENDERER]


async def rows(request: web.Request, name: str, params: Mapping[str, Any] | None = None) -> list[Row]:
    return await database(request).rows(user(request).name, name, params)


async def row(request: web.Request, name: str, params: Mapping[str, Any] | None = None) -> Row | None:
    return await database(request).row(user(request).name, name, params)


def show(request: web.Request, template: str, *, status: int = 200, **context: Any) -> web.Response:
    return renderer(request).page(request, template, status=status, **context)


def config_value(request: web.Request, name: str) -> Any:
    return getattr(request.app[CONFIG], name)


# -- reading filters -------------------------------------------------------------------------------


def text(query: Mapping[str, Any], name: str, *, size: int = 255) -> str | None:
    value = str(query.get(name) or "").strip()
    if not value:
        return None
    if len(value) > size:
        raise InvalidInput(f"{name}: at most {size} characters")
    return value


def number(query: Mapping[str, Any], name: str) -> int | None:
    value = str(query.get(name) or "").strip()
    if not value:
        return None
    if not re.fullmatch(r"-?\d{1,18}", value):
        raise InvalidInput(f"{name}: a whole number, got {value[:40]!r}")
    return int(value)


def moment(query: Mapping[str, Any], name: str) -> datetime | None:
    """An ISO time (a date, or a date and time; UTC unless it says otherwise)."""
    value = str(query.get(name) or "").strip()
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(
            f"{name}: a time like 2026-12-01 or 2026-12-01T10:00, got {value[:40]!r}"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def choice(query: Mapping[str, Any], name: str, allowed: Sequence[str]) -> str | None:
    value = text(query, name)
    if value is not None and value not in allowed:
        raise InvalidInput(f"{name}: one of {', '.join(allowed)}, got {value[:40]!r}")
    return value


def args_filter(query: Mapping[str, Any]) -> dict[str, Any] | None:
    """`args`: a JSON object a job's args must contain. Secret-looking keys are refused: a
    filter on them would tell a reader what a masked value is."""
    raw = text(query, "args", size=2000)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        raise InvalidInput('args: a JSON object such as {"order_id": 42}') from None
    if not isinstance(value, dict):
        raise InvalidInput('args: a JSON object such as {"order_id": 42}')
    if _secret_keys(value):
        raise InvalidInput(
            "args: no filtering on secret-looking keys (" + ", ".join(_secret_keys(value)) + ")"
        )
    return value


def _secret_keys(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [k for k in value if SECRET_KEY.search(str(k))] + [
            s for v in value.values() for s in _secret_keys(v)
        ]
    if isinstance(value, list):
        return [s for v in value for s in _secret_keys(v)]
    return []


def ids(values: Sequence[str], what: str = "job") -> list[int]:
    found = []
    for value in values:
        value = value.strip()
        if not re.fullmatch(r"\d{1,18}", value):
            raise InvalidInput(f"not a {what} id: {value[:40]!r}")
        found.append(int(value))
    return found


def selected(form: MultiDictProxy[Any], name: str = "id") -> list[str]:
    return [str(v) for v in form.getall(name, [])]


def confirmed(form: Mapping[str, Any]) -> bool:
    return str(form.get("confirm", "")) == "yes"


# -- bulk actions -------------------------------------------------------------------------------------


@dataclass
class Bulk:
    """What a bulk action did: each item done, each skipped with why, and, when it ran out of
    time over "everything the filter matches", how to go on."""

    action: str
    done: list[int] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)
    unfinished: bool = False

    def add(
        self, results: Sequence[Row], *, key: str = "job_id", flag: str = "done", why: str = "detail"
    ) -> None:
        for r in results:
            if r[flag]:
                self.done.append(r[key])
            else:
                self.skipped.append((r[key], r[why] or "skipped"))


Chunk = Callable[[Any], Awaitable[tuple[list[int], Any]]]


async def everything(
    request: web.Request, bulk: Bulk, next_chunk: Chunk, act: Callable[[list[int]], Awaitable[None]]
) -> None:
    """Run `act` over every chunk `next_chunk` yields (each chunk its own transaction, so what
    is done stays done), until none is left or the time budget is spent (then `unfinished`)."""
    budget = time.monotonic() + config_value(request, "bulk_seconds")
    cursor: Any = None
    while True:
        chunk, cursor = await next_chunk(cursor)
        if not chunk:
            return
        await act(chunk)
        if time.monotonic() > budget:
            bulk.unfinished = True
            return


def result(request: web.Request, bulk: Bulk, *, back: str, status: int | None = None) -> web.Response:
    code = status if status is not None else (200 if not bulk.skipped or bulk.done else 409)
    return show(request, "result.html", status=code, bulk=bulk, back=back)


async def confirm(request: web.Request, *, what: str, back: str) -> web.Response:
    """The page that asks before anything destructive (JavaScript or not): the same form again,
    with confirm=yes."""
    form = await request.post()
    fields = [(k, str(v)) for k, v in form.items() if k not in ("csrf", "confirm")]
    return show(request, "confirm.html", what=what, fields=fields, action=request.path_qs, back=back)


def back_to(request: web.Request, form: Mapping[str, Any], route: str) -> str:
    """Where a result page links back to: the form's own page (a local path only), else `route`."""
    back = str(form.get("back", ""))
    if back.startswith("/") and not back.startswith("//") and "\\" not in back:
        return back
    return str(request.app.router[route].url_for())


@dataclass
class Page:
    """A bounded list page: its rows, and where the next one starts: after the last row shown,
    or, when the page is short because the read ran out (searched), after the last row read
    (the figures row's lowest* columns)."""

    rows: list[Row]
    searched: bool
    after: Row | None

    def cursor(self, shown: Sequence[str], read: Sequence[str]) -> list[Any] | None:
        """The next page's cursor values: the `shown` columns of the last row, or the `read`
        columns of the figures when the read ran out; None at the end."""
        if self.after is None:
            return None
        return [self.after[c] for c in (read if self.searched else shown)]


def paged(found: Sequence[Row], *, key: str, size: int, scan: int) -> Page:
    """The rows of a bounded read (a row whose `key` is NULL carries only the figures)."""
    rows = [r for r in found if r[key] is not None]
    if len(rows) == size:
        return Page(rows, False, rows[-1])
    if found and found[0]["scanned"] >= scan:
        return Page(rows, True, found[0])
    return Page(rows, False, None)
