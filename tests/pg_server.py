"""A real PostgreSQL server for the tests: the one `TREEFLOW_TEST_POSTGRES_URL` names, else one
started here from Debian's binaries (installed with apt when missing and possible), else a skip
that says why."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

URL_ENV = "TREEFLOW_TEST_POSTGRES_URL"


class NoPostgres(Exception):
    """No PostgreSQL server can be started here; the message says why."""


def _binaries() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return os.path.dirname(found[-1]) if found else None


def _install() -> None:
    """`apt-get install postgresql` (Debian's package), when we are root and apt is there."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise NoPostgres("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb) and apt-get cannot "
                         "install it here (needs root and apt-get): apt-get install postgresql")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:  # perhaps no package lists yet
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise NoPostgres(f"apt-get install postgresql failed: {done.stderr.strip().splitlines()[-1:]}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yields the URL of a running server (superuser ``postgres``, trust auth, on 127.0.0.1);
    stops it and removes its files at the end. Raises `NoPostgres` when none can be had."""
    given = os.environ.get(URL_ENV)
    if given:
        yield given
        return
    bindir = _binaries()
    if bindir is None:
        _install()
        bindir = _binaries()
        if bindir is None:
            raise NoPostgres("apt-get installed postgresql but no /usr/lib/postgresql/*/bin/initdb appeared")
    # The server refuses to run as root: run it as the postgres user the package created.
    as_user: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            raise NoPostgres("running as root and runuser is missing: cannot start PostgreSQL as another user")
        as_user = ["runuser", "-u", "postgres", "--"]
    home = tempfile.mkdtemp(prefix="treeflow-pg-")
    os.chmod(home, 0o755)
    data, log = os.path.join(home, "data"), os.path.join(home, "server.log")
    if as_user:
        shutil.chown(home, "postgres", "postgres")

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=timeout)

    port = _free_port()
    try:
        done = run(f"{bindir}/initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        if done.returncode != 0:
            raise NoPostgres(f"initdb failed: {done.stderr.strip()}")
        done = run(f"{bindir}/pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "-o",
                   f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        if done.returncode != 0:
            tail = open(log).read()[-2000:] if os.path.exists(log) else ""
            raise NoPostgres(f"pg_ctl start failed: {done.stderr.strip()} {tail}")
        try:
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            run(f"{bindir}/pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(home, ignore_errors=True)
