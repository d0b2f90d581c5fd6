"""Debian packages the test suite and the benchmark install when missing (chromium,
redis-tools, wrk): with apt-get, as root, never by hand."""

from __future__ import annotations

import os
import shutil
import subprocess

APT_TIMEOUT_SECONDS = 300


def apt_install(*packages: str, timeout: float = APT_TIMEOUT_SECONDS) -> str | None:
    """Install Debian packages; why it could not, or None. ``timeout`` per apt-get run."""
    if not shutil.which("apt-get"):
        return "no apt-get on this system"
    if os.geteuid() != 0:
        return f"installing {' '.join(packages)} needs root (apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", *packages],
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
