"""Debian's headless Chromium for the browser tests: found, else installed with apt when we are root
and apt is there, else a reason to skip. Playwright drives it (`executable_path`); it never
downloads a browser of its own."""

from __future__ import annotations

import os
import shutil
import subprocess

#: Where Debian's chromium package puts its launcher; CHROMIUM_PATH names another.
CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
PATH_ENV = "CHROMIUM_PATH"


class NoBrowser(Exception):
    """No Chromium can be had here; the message says why."""


def _found() -> str | None:
    given = os.environ.get(PATH_ENV)
    if given:
        return given if os.access(given, os.X_OK) else None
    return next((path for path in CANDIDATES if os.access(path, os.X_OK)), None)


def chromium_path() -> str:
    """The Chromium binary to launch; installs Debian's `chromium` package first if needed."""
    found = _found()
    if found:
        return found
    if os.environ.get(PATH_ENV):
        raise NoBrowser(f"{PATH_ENV}={os.environ[PATH_ENV]} is not an executable")
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise NoBrowser("Chromium is not installed (/usr/bin/chromium) and apt-get cannot install it here "
                        "(needs root and apt-get): apt-get install chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:  # perhaps no package lists yet
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    found = _found()
    if done.returncode != 0 or found is None:
        raise NoBrowser(f"apt-get install chromium failed: {done.stderr.strip().splitlines()[-1:]}")
    return found
