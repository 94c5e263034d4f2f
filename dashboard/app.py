"""The console as an aiohttp application: its routes, and the middleware every request passes.

Order of the checks, for every request: security headers on every answer; /health, /login and
/static are open; everything else needs a user (a session cookie, or a trusted proxy's header),
the route's capability for that user's role, and, for a POST, the session's CSRF token (form
field `csrf` or header X-CSRF-Token). Errors become a page that says what went wrong (403, 404,
400 with the database's own words, 503 when the database is away), never a traceback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from pgdispatch.dashboard.auth import LOGINS, SESSION_COOKIE, SESSIONS, USER, Logins, Sessions, User, same
from pgdispatch.dashboard.config import CONFIG, DashboardConfig
from pgdispatch.dashboard.database import DATABASE, ConsoleDatabase
from pgdispatch.dashboard.render import RENDERER, STATIC, Renderer
from pgdispatch.dashboard.views import audit, commands, crm, dead, jobs, leads, overview, processes, users
from pgdispatch.dashboard.views.common import ROUTES, Handler, Route
from pgdispatch.dashboard.views.login import login, login_page, logout, set_session_cookie
from pgdispatch.db.errors import DatabaseUnavailable, InvalidInput, NotAllowed, NotFound, PgDispatchError

log = logging.getLogger(__name__)

VIEWS = (overview, jobs, dead, processes, commands, leads, crm, audit, users)  # each registers its ROUTES
OPEN = ("/health", "/login", "/static/")

# Pages are the operator's own: never cached, never framed, no script but our own files.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


def make_app(config: DashboardConfig) -> web.Application:
    """The console; `pgdispatch dashboard` serves it, or mount it in your own aiohttp app
    (app.add_subapp("/console", make_app(config)))."""
    app = web.Application(middlewares=[_headers, _errors, _authenticated])
    app[CONFIG] = config
    app[RENDERER] = Renderer(title=config.title)
    app.cleanup_ctx.append(_database)
    app.router.add_get("/health", _health, name="health")
    app.router.add_get("/login", login_page, name="login_page")
    app.router.add_post("/login", login, name="login")
    app.router.add_post("/logout", logout, name="logout")
    app.router.add_static("/static/", STATIC, name="static", append_version=True)
    for route in ROUTES:
        # Pages by their function's name (url_for("jobs")); actions by module and function.
        name = (
            route.handler.__name__
            if route.method == "GET"
            else f"{route.handler.__module__.rsplit('.', 1)[-1]}.{route.handler.__name__}"
        )
        app.router.add_route(route.method, route.path, _guarded(route), name=name)
    return app


async def _database(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    database = ConsoleDatabase(config.database_url, settings=config.connections, max_size=config.pool_size)
    await database.open()
    if await database.superuser():
        log.warning(
            "the console connects as a superuser: its SQL runs with every right. Give it a login of "
            "its own with only the dispatch_console role (CREATE ROLE console LOGIN PASSWORD '...'; "
            "GRANT dispatch_console TO console)"
        )
    app[DATABASE] = database
    app[SESSIONS] = Sessions(database, hours=config.session_hours)
    app[LOGINS] = Logins(database)
    yield
    await database.close()


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _guarded(route: Route) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        found = request[USER]
        if not found.can(route.can):
            raise NotAllowed(f"a {found.role.replace('_', ' ')} may not do that")
        return await route.handler(request)

    handler.__name__ = route.handler.__name__
    return handler


@web.middleware
async def _headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Security headers on every answer, and Server-Timing: how long the console took (the
    dashboard bench reads it; so can a browser's developer tools)."""
    began = time.perf_counter()
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        _secure(exc, request, began)
        raise
    _secure(response, request, began)
    return response


def _secure(response: web.StreamResponse, request: web.Request, began: float) -> None:
    response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - began) * 1000:.1f}"
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    if not request.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-store")


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except NotAllowed as exc:
        return _problem(request, 403, "Not allowed", str(exc))
    except NotFound as exc:
        return _problem(request, 404, "Not found", str(exc))
    except InvalidInput as exc:
        return _problem(request, 400, "Not done", str(exc))
    except DatabaseUnavailable as exc:
        return _problem(request, 503, "The database is unavailable", str(exc))
    except PgDispatchError as exc:
        return _problem(request, 500, "Not done", str(exc))
    except Exception:  # a bug of ours: logged whole, shown as one line
        log.exception("console error on %s %s", request.method, request.path)
        return _problem(request, 500, "Something went wrong", "The console hit an error (it is in its log).")


def _problem(request: web.Request, status: int, title: str, message: str) -> web.Response:
    return request.app[RENDERER].page(request, "problem.html", status=status, heading=title, message=message)


@web.middleware
async def _authenticated(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith(OPEN) and request.match_info.route.name in (
        "health",
        "login_page",
        "login",
        "static",
    ):
        return await handler(request)
    user, new_token = await _user(request)
    if user is None:
        if request.method == "GET" and request.headers.get("HX-Request") != "true":
            raise web.HTTPFound(request.app.router["login_page"].url_for().with_query(next=request.path_qs))
        return _problem(request, 401, "Log in first", "Your session has ended: log in again.")
    request[USER] = user
    if request.method not in ("GET", "HEAD") and not await _csrf_ok(request, user):
        return _problem(
            request,
            403,
            "Not done",
            "This form did not come from this console, or its session changed: reload the page "
            "and try again.",
        )
    response = await handler(request)
    if new_token:
        set_session_cookie(request, response, new_token)
    return response


async def _user(request: web.Request) -> tuple[User | None, str | None]:
    """The session's user; behind a trusted proxy, the account its header names (a session is
    started for it, so its forms carry a CSRF token too)."""
    config = request.app[CONFIG]
    sessions = request.app[SESSIONS]
    token = request.cookies.get(SESSION_COOKIE)
    proxied = (
        request.headers.get(config.user_header)
        if config.user_header and config.trusts(request.remote)
        else None
    )
    user = await sessions.user(token)
    if proxied is None:
        return user, None
    if user is not None and user.name == proxied:
        return user, None
    if not await sessions.proxied(proxied):
        return None, None
    token = await sessions.start(proxied, request.remote)
    return await sessions.user(token), token


async def _csrf_ok(request: web.Request, user: User) -> bool:
    given = request.headers.get("X-CSRF-Token")
    if given is None:
        form: Any = await request.post()
        given = str(form.get("csrf", ""))
    return same(given, user.csrf)
