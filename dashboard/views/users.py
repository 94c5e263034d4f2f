"""Console accounts (admins only): add, disable, enable, set a password, delete. The same as
`pgdispatch users ...`; every change is audited."""

from __future__ import annotations

import asyncio
import re

from aiohttp import web

from pgdispatch.dashboard.auth import ROLES, Can, check_password, hash_password
from pgdispatch.dashboard.views.common import (
    confirm,
    confirmed,
    page,
    row,
    rows,
    show,
    text,
    user,
)
from pgdispatch.db.errors import InvalidInput


@page("GET", "/users", Can.ADMIN)
async def users(request: web.Request) -> web.StreamResponse:
    return show(request, "users.html", users=await rows(request, "console_users"), roles=ROLES)


@page("POST", "/users/add", Can.ADMIN)
async def add(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    name, role = text(form, "name", size=64), text(form, "role")
    if name is None or role not in ROLES:
        raise InvalidInput(f"give a name and a role ({', '.join(ROLES)})")
    password = str(form.get("password", ""))
    if (problem := check_password(password)) is not None:
        raise InvalidInput(problem)
    enterprises = [e for e in re.split(r"[\s,]+", str(form.get("enterprises", ""))) if e]
    entities = [int(e) for e in re.split(r"[\s,]+", str(form.get("entities", ""))) if e.isdigit()]
    await _change(
        request,
        "console_user_add",
        {
            "name": name,
            "role": role,
            "password_hash": await asyncio.to_thread(hash_password, password),
            "enterprises": enterprises,
            "entities": entities,
        },
    )
    raise web.HTTPSeeOther(request.app.router["users"].url_for())


@page("POST", "/users/{name}/disable", Can.ADMIN)
async def disable(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name == user(request).name:
        raise InvalidInput("you cannot disable your own account here (another admin can)")
    await _change(request, "console_user_set_disabled", {"name": name, "disabled": True})
    raise web.HTTPSeeOther(request.app.router["users"].url_for())


@page("POST", "/users/{name}/enable", Can.ADMIN)
async def enable(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    await _change(request, "console_user_set_disabled", {"name": name, "disabled": False})
    raise web.HTTPSeeOther(request.app.router["users"].url_for())


@page("POST", "/users/{name}/password", Can.ADMIN)
async def password(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    name = request.match_info["name"]
    new = str(form.get("password", ""))
    if (problem := check_password(new)) is not None:
        raise InvalidInput(problem)
    await _change(
        request,
        "console_user_password",
        {"name": name, "password_hash": await asyncio.to_thread(hash_password, new)},
    )
    raise web.HTTPSeeOther(request.app.router["users"].url_for())


@page("POST", "/users/{name}/delete", Can.ADMIN)
async def delete(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    name = request.match_info["name"]
    if name == user(request).name:
        raise InvalidInput("you cannot delete your own account")
    if not confirmed(form):
        return await confirm(
            request,
            what=f"Delete the console account {name}? Its sessions end at once.",
            back=str(request.app.router["users"].url_for()),
        )
    await _change(request, "console_user_delete", {"name": name})
    raise web.HTTPSeeOther(request.app.router["users"].url_for())


async def _change(request: web.Request, query: str, params: dict[str, object]) -> None:
    await row(request, query, {**params, "who": user(request).who})
