"""Debian packages the test suite and the benchmark install when missing (chromium,
redis-tools, wrk): with apt-get, as root, never by hand.

The suite runs in several processes, and two of them may want a package at once
(chromium for the browser test, redis-tools for the TLS test): one process-wide file
lock takes them in turn, and apt-get itself waits for dpkg's lock when another apt
(unattended-upgrades, a person) holds it, instead of failing at once.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

APT_TIMEOUT_SECONDS = 300
# Beside apt's own state, root's alone: not in a world-writable temporary directory.
_LOCK = Path("/var/cache/apt/broker-apt-get.lock")


def apt_install(*packages: str, timeout: float = APT_TIMEOUT_SECONDS) -> str | None:
    """Install Debian packages; why it could not, or None. ``timeout`` per apt-get run."""
    if not shutil.which("apt-get"):
        return "no apt-get on this system"
    if os.geteuid() != 0:
        return f"installing {' '.join(packages)} needs root (apt-get)"
    _LOCK.parent.mkdir(parents=True, exist_ok=True)
    with _LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _apt_get(packages, timeout)


def _apt_get(packages: tuple[str, ...], timeout: float) -> str | None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    wait = ["-o", f"DPkg::Lock::Timeout={int(timeout)}"]
    for argv in (
        ["apt-get", *wait, "update"],
        ["apt-get", *wait, "install", "-y", "--no-install-recommends", *packages],
    ):
        try:
            done = subprocess.run(
                argv,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"`{' '.join(argv)}` failed: {exc}"
        if done.returncode != 0:
            return f"`{' '.join(argv)}` exited {done.returncode}: {done.stderr.strip()[-500:]}"
    return None
