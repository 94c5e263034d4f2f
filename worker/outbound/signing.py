"""Signing at send time: JWTs (PyJWT) and Standard Webhooks signatures.

Key material is read from dispatch.signing_keys (only the worker role may) and cached briefly in
the process; it never reaches logs, errors or the attempt log.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import jwt
import psycopg

from pgdispatch.db.connections import DIRECT, ConnectionSettings, own_database
from pgdispatch.notify.cache import KeyedCache
from pgdispatch.worker.outcome import InvalidJob


@dataclass(frozen=True)
class SigningKey:
    name: str
    algorithm: str
    secret: str = field(repr=False)  # keep key material out of every repr and log line
    ttl_seconds: int


class SigningKeys:
    """Keys by name, cached for `ttl` seconds, loaded over one lazily opened connection.
    The worker calls invalidate() when dispatch.signing_keys changes (NOTIFY), so a rotated
    key is used at once, even when the change lands while the old key is being loaded; the TTL
    is the safety net."""

    def __init__(self, database_url: str, *, ttl: float = 30.0,
                 settings: ConnectionSettings = DIRECT) -> None:
        self._url = database_url
        self._settings = settings
        self._cache: KeyedCache[str, SigningKey] = KeyedCache(self._load, ttl=ttl)
        self._conn: psycopg.AsyncConnection[tuple[Any, ...]] | None = None

    async def get(self, name: str) -> SigningKey:
        return await self._cache.get(name)

    def invalidate(self) -> None:
        self._cache.invalidate()

    def stats(self) -> dict[str, int]:
        return asdict(self._cache.counters)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def _load(self, name: str) -> SigningKey:
        with own_database():
            if self._conn is None or self._conn.closed:
                self._conn = await psycopg.AsyncConnection.connect(self._url, **self._settings.kwargs())
            try:
                cur = await self._conn.execute(
                    "SELECT name, algorithm, secret, ttl_seconds FROM dispatch.signing_keys WHERE name = %s",
                    (name,))
                row = await cur.fetchone()
            except psycopg.OperationalError:
                await self._conn.close()
                raise
        if row is None:
            raise InvalidJob(f"no signing key named {name!r} in dispatch.signing_keys")
        return SigningKey(*row)


def sign_jwt(key: SigningKey, claims: dict[str, Any], *, job_id: int,
             expire_at: datetime | None, now: float) -> str:
    """A JWT over `claims` with iat, exp (never past expire_at) and jti = the job id."""
    exp = now + key.ttl_seconds
    if expire_at is not None:
        exp = min(exp, expire_at.timestamp())
    payload = {**claims, "iat": int(now), "exp": int(exp), "jti": str(job_id)}
    try:
        return jwt.encode(payload, _jwt_key(key), algorithm=key.algorithm)
    except (ValueError, TypeError, jwt.PyJWTError) as exc:
        # The message of a key-parsing error may quote the key: say only which key failed.
        raise InvalidJob(f"signing key {key.name!r} cannot sign {key.algorithm}: "
                         f"{type(exc).__name__}") from None


def webhook_headers(key: SigningKey, *, message_id: str, body: bytes, now: float) -> dict[str, str]:
    """Standard Webhooks: webhook-id, webhook-timestamp, webhook-signature (v1, HMAC-SHA256)."""
    timestamp = str(int(now))
    secret = key.secret
    raw = base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_") else secret.encode()
    signed = message_id.encode() + b"." + timestamp.encode() + b"." + body
    signature = base64.b64encode(hmac.new(raw, signed, hashlib.sha256).digest()).decode()
    return {"webhook-id": message_id, "webhook-timestamp": timestamp,
            "webhook-signature": f"v1,{signature}"}


def _jwt_key(key: SigningKey) -> Any:
    if key.algorithm == "HS256":
        return key.secret.encode()
    return key.secret  # PEM private key; PyJWT loads it with `cryptography`
