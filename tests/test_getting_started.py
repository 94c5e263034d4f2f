"""Every code block of docs/getting-started.md, run in order, as a new user would: in a fresh clone
of this repository, in a new virtualenv, against the test's database (DATABASE_URL). A bash
block marked `# runs until Ctrl-C` runs in the background; `<!-- test: stop the background
commands -->` before a block stops them (SIGINT, as Ctrl-C). A python block with a title is written
to that file; one without runs with the clone's Python. Marked `docs`: it installs the package
(a minute or two); CI runs it, skip it locally with -m 'not docs'."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.docs

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "getting-started.md"
FENCE = re.compile(r"(?P<stop><!-- test: stop the background commands -->\n)?```(?P<lang>\w+)(?P<info>[^\n]*)\n"
                   r"(?P<body>.*?)\n```", re.S)


def blocks() -> list[tuple[str, str, str, bool]]:
    found = []
    for match in FENCE.finditer(PAGE.read_text()):
        title = re.search(r'title="([^"]+)"', match.group("info"))
        found.append((match.group("lang"), title.group(1) if title else "", match.group("body"),
                      bool(match.group("stop"))))
    return found


def test_the_page_has_the_blocks_a_new_user_needs() -> None:
    langs = [lang for lang, _, _, _ in blocks()]
    assert langs.count("bash") >= 6 and "python" in langs
    assert any("worker --migrate" in body for _, _, body, _ in blocks())


def _stop(background: list[subprocess.Popen[bytes]]) -> None:
    for proc in background:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc in background:
        assert proc.wait(60) in (0, 130), f"a background command ended with {proc.returncode}"
    background.clear()


def test_every_block_of_getting_started_runs_in_a_fresh_clone(db_url: str, tmp_path: Path) -> None:
    if shutil.which("git") is None or shutil.which("psql") is None:
        pytest.skip("git and psql are needed (the page uses psql)")
    clone = tmp_path / "pgdispatch"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    # The working tree as it is now (the commit under test may not be committed yet).
    for path in ("docs", "console", "worker", "db", "dashboard", "sql", "notify", "pgdispatch", "pyproject.toml",
                 "alembic", "bench", "cli.py"):
        source = ROOT / path
        target = clone / path
        if source.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target, symlinks=True)
        else:
            shutil.copy2(source, target)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGDISPATCH_", "VIRTUAL_ENV"))}
    env.update(DATABASE_URL=db_url, PGDISPATCH_LOG="WARNING", PGDISPATCH_ALLOW_DESTINATIONS="")
    background: list[subprocess.Popen[bytes]] = []
    log = (tmp_path / "background.log").open("wb")
    try:
        for lang, title, body, stop in blocks():
            if stop:
                _stop(background)
            if lang == "python":
                if title:
                    (clone / title).parent.mkdir(parents=True, exist_ok=True)
                    (clone / title).write_text(body + "\n")
                continue
            assert lang == "bash", lang
            for command in body.splitlines():
                if not command.strip() or command.lstrip().startswith("#"):
                    continue
                if "# runs until Ctrl-C" in command:
                    background.append(subprocess.Popen(["bash", "-c", command.split("#")[0]], cwd=clone, env=env,
                                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
                    _until_ready(command, db_url, background[-1], tmp_path)
                    continue
                done = subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True,
                                      timeout=600)
                assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
        _stop(background)
    finally:
        for proc in background:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    # What the page said would happen, happened.
    import psycopg

    with psycopg.connect(db_url) as conn:
        greeted = conn.execute("SELECT count(*) FROM dispatch.job_history WHERE kind = 'greeting.send' "
                               "AND outcome = 'completed'").fetchone()
        request = conn.execute("SELECT count(*) FROM dispatch.dead_jobs WHERE kind = 'http.request'").fetchone()
        noops = conn.execute("SELECT count(*) FROM dispatch.job_history WHERE kind = 'debug.noop'").fetchone()
    assert greeted == (2,) and request == (1,) and noops == (2,)


def _until_ready(command: str, db_url: str, proc: subprocess.Popen[bytes], tmp_path: Path) -> None:
    """A background command is up: the worker pool has a live worker; the console answers."""
    import psycopg

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "background.log").read_text()[-3000:]
        try:
            if " dashboard" in command:
                with urllib.request.urlopen("http://127.0.0.1:8080/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            else:
                with psycopg.connect(db_url) as conn:
                    row = conn.execute("SELECT count(*) FROM dispatch.worker_status WHERE status = 'alive'").fetchone()
                if row and row[0]:
                    return
        except (OSError, psycopg.Error):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{command!r} did not come up in 120 s")
