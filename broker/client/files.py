"""Where the CLI keeps its session and credential cache, readable only by the user."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

HOME_ENV = "BROKER_CLI_HOME"


def home() -> Path:
    explicit = os.environ.get(HOME_ENV)
    if explicit:
        return Path(explicit)
    config = os.environ.get("XDG_CONFIG_HOME")
    return (Path(config) if config else Path.home() / ".config") / "broker"


def digest(*parts: str) -> str:
    """A file name for a tuple of values (JSON-encoded, so no two tuples collide)."""
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    # mkdir's mode is masked by the umask and ignored for an existing directory.
    path.chmod(0o700)
    return path


def write_private(path: Path, value: Any) -> None:
    """Write JSON that only the user may read, atomically: a concurrent reader (two AWS
    commands at once) sees the old file or the new one, never half of either."""
    directory = private_dir(path.parent)
    fd, temp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as out:
            os.fchmod(out.fileno(), 0o600)
            json.dump(value, out)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def read_private(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing, unreadable or not ours
    to trust (readable by others: someone may have planted or copied it)."""
    try:
        if path.stat().st_mode & 0o077:
            return None
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def remove(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
