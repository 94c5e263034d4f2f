"""A real PgBouncer (Debian's package) in transaction mode in front of the test server, started
by the test that needs it: for the items about running behind a transaction pooler."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

BINARY = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def installed() -> bool:
    return Path(BINARY).exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _unprivileged_user() -> str:
    for name in ("embedded_postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name).pw_name
    raise AssertionError("no unprivileged user to run PgBouncer as")


@contextlib.contextmanager
def pgbouncer(server_url: str, *, pool_size: int = 4) -> Iterator[str]:
    """PgBouncer in transaction mode before the server of `server_url`; yields a URL like
    server_url's, to the same user and database, through the pooler."""
    target = psycopg.conninfo.conninfo_to_dict(server_url)
    host = str(target.get("host") or "127.0.0.1")
    port = _free_port()
    home = Path(tempfile.mkdtemp(prefix="pgb-"))
    home.chmod(0o777)
    user = str(target.get("user") or "postgres")
    # Clients are trusted; the password written here is the one PgBouncer logs in to the server
    # with (a container's server asks for it, the embedded one trusts local users).
    password = str(target.get("password") or "").replace('"', '""')
    (home / "users.txt").write_text(f'"{user}" "{password}"\n')
    (home / "pgbouncer.ini").write_text(f"""[databases]
* = host={host} port={target.get("port") or 5432}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {home / "users.txt"}
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 500
server_reset_query =
ignore_startup_parameters = extra_float_digits
logfile = {home / "pgbouncer.log"}
""")
    for path in home.iterdir():
        path.chmod(0o666)
    command = [BINARY, str(home / "pgbouncer.ini")]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root: the user that runs the embedded
        command[1:1] = ["-u", _unprivileged_user()]  # server may reach its socket
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = psycopg.conninfo.make_conninfo(server_url, host="127.0.0.1", port=str(port))
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                psycopg.connect(url, connect_timeout=2, prepare_threshold=None).close()
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise AssertionError(f"pgbouncer did not start: {(home / 'pgbouncer.log').read_text()}") from None
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(home, ignore_errors=True)
