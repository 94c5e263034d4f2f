"""Who is asking, and what they may do.

Accounts live in dispatch.console_users (`pgdispatch users add|list|disable|enable|passwd`),
passwords hashed with argon2id. A login makes a session: a random token in an HttpOnly,
SameSite=Lax cookie (Secure over HTTPS), of which the database keeps only the SHA-256, with its
own CSRF token that every form and htmx request carries back; it ends after `session_hours`
without a request, or at logout. Failed logins are counted per name and per address: each
failure answers after a second, and five for a name (thirty for an address) in fifteen minutes
refuse further tries until the window has passed. With a trusted reverse proxy, its user header
names the account (only for requests from the proxy's addresses), and a session is made for it
the same way (so forms still carry a CSRF token).

Roles, enforced for every request on the server (and again in the SQL functions):
  viewer            reads every page (masked)
  operator          and every action
  enterprise_admin  the CRM and lead pages of their own enterprises and entities, and their actions
  admin             everything, and the users page
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum

from aiohttp import web
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from pgdispatch import sql
from pgdispatch.dashboard.database import ConsoleDatabase

ROLES = ("viewer", "operator", "enterprise_admin", "admin")
SESSION_COOKIE = "pgdispatch_session"
LOGIN_COOKIE = "pgdispatch_login"  # the login form's CSRF token (double-submitted)
FAILURE_WINDOW = timedelta(minutes=15)
FAILURES_PER_NAME = 5
FAILURES_PER_ADDRESS = 30
FAILURE_DELAY = 1.0  # seconds every failed login waits before it is answered

_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the account does not exist, so that a wrong name costs what a wrong
    password costs (no telling which names exist by the time an answer takes). Made at the first
    login, not at import: every `pgdispatch` command imports this module, and a hash takes 64 MiB
    and a tenth of a second."""
    return _hasher.hash(secrets.token_urlsafe(16))


class Can(Enum):
    READ = "read"  # the engine's pages: overview, jobs, dead letters, processes, commands, audit
    ACT = "act"  # the engine's actions
    READ_SCOPED = "read scoped"  # CRM and lead pages (an enterprise admin: their own)
    ACT_SCOPED = "act scoped"  # CRM and lead actions (an enterprise admin: their own)
    ADMIN = "admin"  # console accounts


_ALLOWED = {
    Can.READ: {"viewer", "operator", "admin"},
    Can.ACT: {"operator", "admin"},
    Can.READ_SCOPED: {"viewer", "operator", "admin", "enterprise_admin"},
    Can.ACT_SCOPED: {"operator", "admin", "enterprise_admin"},
    Can.ADMIN: {"admin"},
}


@dataclass(frozen=True)
class User:
    name: str
    role: str
    enterprises: tuple[str, ...]
    entities: tuple[int, ...]
    csrf: str

    def can(self, what: Can) -> bool:
        return self.role in _ALLOWED[what]

    @property
    def can_read(self) -> bool:
        return self.can(Can.READ)

    @property
    def can_act(self) -> bool:
        return self.can(Can.ACT)

    @property
    def can_act_scoped(self) -> bool:
        return self.can(Can.ACT_SCOPED)

    @property
    def who(self) -> str:
        """The audit log's name for this user."""
        return f"{self.name}@console"


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def check_password(password: str) -> str | None:
    """Why a password is not good enough, or None."""
    if len(password) < 10:
        return "a password has at least 10 characters"
    if len(password) > 1024:
        return "a password has at most 1024 characters"
    return None


async def _verify(stored: str | None, password: str) -> bool:
    def verify() -> bool:
        try:
            return _hasher.verify(stored or _dummy_hash(), password) and stored is not None
        except (VerificationError, InvalidHashError):
            return False

    return await asyncio.to_thread(verify)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def same(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a), str(b))


class Sessions:
    def __init__(self, database: ConsoleDatabase, *, hours: float) -> None:
        self._db = database
        self._lifetime = timedelta(hours=hours)

    async def user(self, token: str | None) -> User | None:
        """The session's user, its expiry moved on (at most once a minute); None when the token
        is unknown, expired, or its account disabled."""
        if not token:
            return None
        async with self._db.transaction(None) as cur:
            await cur.execute(
                sql.query("console_session_touch"), {"hash": _digest(token), "life": self._lifetime}
            )
            await cur.execute(sql.query("console_session_user"), {"hash": _digest(token)})
            row = await cur.fetchone()
        if row is None:
            return None
        return User(
            row["name"], row["role"], tuple(row["enterprises"]), tuple(row["entities"]), row["csrf_token"]
        )

    async def start(self, name: str, address: str | None) -> str:
        """A new session for `name`: the cookie's token."""
        token = secrets.token_urlsafe(32)
        await self._db.rows(
            None,
            "console_session_start",
            {
                "hash": _digest(token),
                "name": name,
                "csrf": secrets.token_urlsafe(32),
                "address": address,
                "life": self._lifetime,
            },
            fetch=False,
        )
        return token

    async def end(self, token: str | None) -> None:
        if token:
            await self._db.rows(None, "console_session_end", {"hash": _digest(token)}, fetch=False)

    async def proxied(self, name: str) -> bool:
        """Whether a proxy-named account exists and is enabled."""
        return await self._db.row(None, "console_account_enabled", {"name": name}) is not None


@dataclass(frozen=True)
class LoginRefused:
    message: str
    status: int


class Logins:
    """Password logins, slowed down and limited after failures."""

    def __init__(self, database: ConsoleDatabase) -> None:
        self._db = database

    async def attempt(self, name: str, password: str, address: str) -> LoginRefused | None:
        """None when the password is right (the failures of that name are forgotten)."""
        row = await self._db.row(
            None, "console_login_state", {"name": name, "address": address, "window": FAILURE_WINDOW}
        )
        assert row is not None
        if row["by_name"] >= FAILURES_PER_NAME or row["by_address"] >= FAILURES_PER_ADDRESS:
            return LoginRefused("Too many failed logins: try again in 15 minutes.", 429)
        if await _verify(row["stored"], password):
            await self._db.rows(None, "console_login_forget", {"name": name}, fetch=False)
            return None
        await self._db.rows(
            None, "console_login_failed", {"name": name[:64], "address": address[:64]}, fetch=False
        )
        await asyncio.sleep(FAILURE_DELAY)
        return LoginRefused("Wrong name or password.", 401)


SESSIONS = web.AppKey("sessions", Sessions)
LOGINS = web.AppKey("logins", Logins)
USER = web.RequestKey("user", User)  # who is asking (set by the app's middleware)
LOGIN_CSRF = web.RequestKey("login_csrf", str)  # the login form's token, for its template
