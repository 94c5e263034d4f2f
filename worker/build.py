"""Build stamps for the version guard: `{git-sha}-{YYYYMMDDHHMMSS}` (seed 003's format), whose
number, the UTC timestamp, is what jobs and workers compare. Later builds get larger numbers, so
a deploy script needs no hand-made counter."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

from pgdispatch.db.errors import ConfigurationError

STAMP = re.compile(r"^(?:(?P<sha>[0-9A-Za-z._]+)-)?(?P<number>\d{1,18})$")
TIMESTAMP_FORMAT = "%Y%m%d%H%M%S"


def new_stamp(sha: str, at: datetime | None = None) -> str:
    when = (at or datetime.now(UTC)).astimezone(UTC)
    return f"{sha}-{when.strftime(TIMESTAMP_FORMAT)}"


def build_number(text: str, *, source: str) -> int:
    """The number of a build given as `42` or as a stamp `3f9c2ab-20261124183000`."""
    match = STAMP.match(text.strip())
    if not match:
        raise ConfigurationError(f"{source} must be a build number (42) or a stamp "
                                 f"(3f9c2ab-20261124183000), got {text.strip()!r}")
    return int(match.group("number"))


def read_stamp(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the build stamp {path}: {exc.strerror}") from None
