"""Login and logout. The login form carries its own CSRF token (a cookie it must match), so a
page elsewhere cannot log a browser in to an account of its choosing."""

from __future__ import annotations

import secrets

from aiohttp import web

from pgdispatch.dashboard.auth import LOGIN_COOKIE, LOGIN_CSRF, LOGINS, SESSION_COOKIE, SESSIONS, same
from pgdispatch.dashboard.config import CONFIG
from pgdispatch.dashboard.views.common import renderer


def _next(request: web.Request, value: str | None) -> str:
    """Where to go after the login: a local path only (no open redirect)."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return str(request.app.router["home"].url_for())


def login_form(request: web.Request, *, error: str | None = None, status: int = 200) -> web.Response:
    token = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(24)
    request[LOGIN_CSRF] = token
    response = renderer(request).page(
        request, "login.html", status=status, error=error, next=_next(request, request.query.get("next"))
    )
    response.set_cookie(
        LOGIN_COOKIE, token, httponly=True, samesite="Strict", secure=secure(request), max_age=3600, path="/"
    )
    return response


async def login_page(request: web.Request) -> web.StreamResponse:
    return login_form(request)


async def login(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    if not same(str(form.get("csrf", "")), request.cookies.get(LOGIN_COOKIE)):
        return login_form(request, error="The login form expired: try again.", status=403)
    name = str(form.get("name", "")).strip()[:64]
    password = str(form.get("password", ""))
    logins = request.app[LOGINS]
    refused = await logins.attempt(name, password, request.remote or "?")
    if refused is not None:
        return login_form(request, error=refused.message, status=refused.status)
    sessions = request.app[SESSIONS]
    token = await sessions.start(name, request.remote)
    response = web.HTTPSeeOther(_next(request, str(form.get("next", ""))))
    set_session_cookie(request, response, token)
    response.del_cookie(LOGIN_COOKIE, path="/")
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    sessions = request.app[SESSIONS]
    await sessions.end(request.cookies.get(SESSION_COOKIE))
    response = web.HTTPSeeOther(request.app.router["login_page"].url_for())
    response.del_cookie(SESSION_COOKIE, path="/")
    raise response


def set_session_cookie(request: web.Request, response: web.StreamResponse, token: str) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        token,
        httponly=True,
        samesite="Lax",
        secure=secure(request),
        path="/",
        max_age=int(request.app[CONFIG].session_hours * 3600),
    )


def secure(request: web.Request) -> bool:
    """Secure cookies over HTTPS: the request's own scheme, or a trusted proxy's word for it."""
    configured = request.app[CONFIG].secure_cookies
    if configured is not None:
        return bool(configured)
    if request.secure:
        return True
    return bool(
        request.app[CONFIG].trusts(request.remote)
        and request.headers.get("X-Forwarded-Proto", "").lower() == "https"
    )
