"""Which settings of each channel are secret (CHANNELS.md, "Which settings are secrets").

Three kinds, because a masking that only looks at key names misses two of them:
  values     the whole value is the secret (a bot token, an API key, an SMTP password);
  url_paths  a URL whose path carries the credential (a Bitrix24 inbound webhook's code, a
             Slack-style /services/T.../B.../... hook, a Telegram base URL's bot<token>): shown
             as scheme://host[:port]/***;
  headers    a setting mapping header names to values: every value (a custom auth header).
Every other setting still goes through the generic masking (db/masking.py).

The database holds the same declarations (dispatch.secret_settings, used by the reader's
views and the CLI); tests/test_secrets.py checks that both agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pgdispatch.db.masking import MASK, mask_document


@dataclass(frozen=True)
class Secrets:
    values: tuple[str, ...] = ()
    url_paths: tuple[str, ...] = ()
    headers: tuple[str, ...] = ()

    def mask(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """The settings as a reader, a log or the CLI may see them."""
        masked = dict(mask_document(dict(settings)))
        for name in self.values:
            if name in settings and settings[name] not in (None, ""):
                masked[name] = MASK
        for name in self.url_paths:
            if isinstance(settings.get(name), str):
                masked[name] = mask_url_path(settings[name])
        for name in self.headers:
            if isinstance(settings.get(name), dict):
                masked[name] = {header: MASK for header in settings[name]}
        return masked


# Lead channels, by credential type (dispatch.credentials.type).
CREDENTIALS: Mapping[str, Secrets] = {
    "webhooks": Secrets(values=("secret",), url_paths=("url",), headers=("headers",)),
    "telegram": Secrets(values=("bot_token",), url_paths=("base_url",)),
    "bitrix24": Secrets(url_paths=("webhook_url",)),
    "amocrm": Secrets(values=("client_secret", "refresh_token", "access_token", "long_lived_token")),
    "email": Secrets(values=("password",)),
}

# CRMs of call events, by integration (dispatch.enterprises.integrations_config keys).
CRMS: Mapping[str, Secrets] = {
    "retailcrm": Secrets(values=("api_key",)),
    "webhook": Secrets(values=("secret",), url_paths=("url",), headers=("headers",)),
}


def mask_url_path(url: str) -> str:
    """scheme://host[:port]/*** : where it goes, not how it authenticates."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return MASK
    if not parts.scheme or not host:
        return MASK
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}{port}/{MASK}"


def mask_credential(type_: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    return CREDENTIALS.get(type_, Secrets()).mask(settings)
