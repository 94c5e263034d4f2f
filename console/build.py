"""Build stamps: `{git-sha}-{timestamp}` written at deploy time, read by workers and producers."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path
from typing import Any

from pgdispatch.console.common import EXIT_OK, Env, emit, say
from pgdispatch.db.errors import ConfigurationError
from pgdispatch.worker.build import build_number, new_stamp, read_stamp

DEFAULT_FILE = Path("var/build/version")


def register(sub: Any) -> None:
    b = sub.add_parser("build", help="build stamps for the version guard")
    bsub = b.add_subparsers(dest="build_command", required=True, metavar="COMMAND")
    s = bsub.add_parser("stamp", help="write {git-sha}-{timestamp} for this deploy")
    s.add_argument("--file", type=Path, default=DEFAULT_FILE, help=f"default {DEFAULT_FILE}")
    s.add_argument("--sha", help="the commit (default: git rev-parse --short=12 HEAD)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=stamp)
    w = bsub.add_parser("show", help="the stamp in a file, its number, and how producers use it")
    w.add_argument("--file", type=Path, default=DEFAULT_FILE, help=f"default {DEFAULT_FILE}")
    w.add_argument("--json", action="store_true")
    w.set_defaults(func=show)


def stamp(env: Env, args: argparse.Namespace) -> int:
    text = new_stamp(args.sha or _git_sha())
    build_number(text, source="--sha")  # a sha with characters a stamp cannot hold
    args.file.parent.mkdir(parents=True, exist_ok=True)
    args.file.write_text(text + "\n", encoding="utf-8")
    return _report(args, text)


def show(env: Env, args: argparse.Namespace) -> int:
    return _report(args, read_stamp(args.file))


def _report(args: argparse.Namespace, text: str) -> int:
    number = build_number(text, source=str(args.file))
    data = {"file": str(args.file), "stamp": text, "number": number}
    emit(args, data, lambda d: say(
        f"{d['stamp']} in {d['file']} (build number {d['number']})\n"
        f"  workers:   PGDISPATCH_BUILD_FILE={d['file']} pgdispatch worker ...\n"
        f"  producers: SET dispatch.build = '{d['number']}'  (or options=-c dispatch.build={d['number']} "
        "in the connection string)"))
    return EXIT_OK


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             check=False, timeout=10)
    except OSError:
        raise ConfigurationError("git is not installed: pass --sha") from None
    if out.returncode != 0:
        raise ConfigurationError("not in a git checkout: pass --sha")
    return out.stdout.strip()
