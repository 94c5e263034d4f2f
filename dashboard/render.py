"""Templates and the formatting they use. Everything is escaped (autoescape): error texts,
args, names and settings come from producers and remotes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup, escape

from pgdispatch.dashboard.auth import LOGIN_CSRF, USER
from pgdispatch.dashboard.charts import bars
from pgdispatch.dashboard.config import CONFIG

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"


def ago(value: datetime | None, now: datetime | None = None) -> str:
    """'3 min ago', 'in 2 h'; '' for None."""
    if value is None:
        return ""
    now = now or datetime.now(UTC)
    seconds = (now - value).total_seconds()
    future = seconds < 0
    seconds = abs(seconds)
    if seconds < 1:
        text = "now"
        return text
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min"), (1, "s")):
        if seconds >= size:
            amount = int(seconds // size)
            text = f"{amount} {unit}"
            break
    return f"in {text}" if future else f"{text} ago"


def absolute(value: datetime | None) -> str:
    if value is None:
        return ""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def when(value: datetime | None) -> Markup:
    """A time as a person reads it: relative, with the absolute one beside it (and in the title)."""
    if value is None:
        return Markup('<span class="muted">—</span>')
    return Markup('<time datetime="{iso}" title="{abs}">{rel}</time> <span class="abs">{abs}</span>').format(
        iso=value.isoformat(), abs=absolute(value), rel=ago(value)
    )


def duration(value: timedelta | float | None) -> str:
    if value is None:
        return ""
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def count(value: int | None, exact: bool = True) -> str:
    if value is None:
        return ""
    return f"{value:,}" if exact else f"≈{value:,}"


def pretty(value: Any) -> str:
    """JSON for a <pre> (escaped by the template)."""
    return json.dumps(value, indent=2, ensure_ascii=False, default=str, sort_keys=True)


def short(value: Any, size: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = " ".join(text.split())
    return text if len(text) <= size else text[: size - 1] + "…"


class Renderer:
    def __init__(self, *, title: str) -> None:
        self.env = Environment(
            loader=FileSystemLoader(TEMPLATES),
            autoescape=select_autoescape(default=True),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(
            ago=ago,
            absolute=absolute,
            when=when,
            duration=duration,
            count=count,
            pretty=pretty,
            short=short,
            bars=bars,
        )
        self.env.globals.update(title=title, escape=escape)

    def page(self, request: web.Request, template: str, *, status: int = 200, **context: Any) -> web.Response:
        user = request.get(USER)
        html = self.env.get_template(template).render(
            request=request,
            user=user,
            csrf=user.csrf if user else request.get(LOGIN_CSRF, ""),
            path=request.path,
            query=request.query,
            link=lambda **changes: link(request, **changes),
            url=lambda route, /, **parts: str(
                request.app.router[route].url_for(**{k: str(v) for k, v in parts.items()})
            ),
            static=lambda name: str(request.app.router["static"].url_for(filename=name)),
            config=request.app[CONFIG],
            refresh_seconds=request.app[CONFIG].refresh_seconds,
            fragment=request.headers.get("HX-Request") == "true"
            and request.headers.get("HX-Target") is not None,
            **context,
        )
        return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")


def link(request: web.Request, **changes: Any) -> str:
    """This page's URL with some query parameters changed (None removes one)."""
    params: dict[str, Any] = dict(request.query)
    for key, value in changes.items():
        if value is None or value == "":
            params.pop(key, None)
        else:
            params[key] = value
    return request.path + ("?" + urlencode(params) if params else "")


def form_list(data: Mapping[str, Any], name: str) -> list[str]:
    """Every value a form sent under `name` (checkboxes)."""
    getall = getattr(data, "getall", None)
    return [str(v) for v in getall(name, [])] if getall else ([str(data[name])] if name in data else [])


RENDERER = web.AppKey("renderer", Renderer)
