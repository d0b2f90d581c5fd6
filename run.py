#!/usr/bin/env python3
"""Bootstrap and entry point: `python3 run.py dev` and `python3 run.py test`.

Needs nothing but Python 3.11+: it creates `.venv/` beside this file, installs the
project with its dev extras (runtime packages at the versions requirements.lock pins),
and re-installs only when pyproject.toml or the lock changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("BROKER_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
STAMP = VENV / ".broker-install-stamp"

USAGE = """usage: python3 run.py COMMAND [ARGS...]

  dev     start the broker on its embedded dev stack (local Redis, STS, OIDC provider)
  test    run the whole gate: ruff, mypy --strict, pytest (args go to pytest)
  check   ruff + mypy only
  bench   run the load benchmark in bench/
  broker  run the `broker` CLI inside the virtualenv (e.g. `run.py broker demo-login`)
"""


LOCK = ROOT / "requirements.lock"
CONSTRAINTS = VENV / "lock-constraints.txt"


def _fingerprint() -> str:
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes())
    digest.update(LOCK.read_bytes())
    return digest.hexdigest()


def _lock_constraints() -> Path:
    """requirements.lock as a pip constraints file, its hashes left out.

    The dev virtualenv then runs exactly the runtime versions production installs from
    the lock (tests/unit/test_lock.py checks it). Without the hashes: one hash in a
    constraints file switches pip to hash-checking for the dev extras and the editable
    install too, which have none.
    """
    pins = [
        line.rstrip().removesuffix("\\").rstrip()
        for line in LOCK.read_text().splitlines()
        if line[:1].isalnum()
    ]
    CONSTRAINTS.write_text("\n".join(pins) + "\n")
    return CONSTRAINTS


def ensure_venv() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - run.py may be started by an old python3
        sys.exit(f"Python 3.11+ is required, this is {sys.version.split()[0]}")
    if not PY.exists():
        print(f"creating virtualenv in {VENV} ...", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    if STAMP.exists() and STAMP.read_text() == _fingerprint():
        return
    print("installing the broker and its dev dependencies (first run only) ...", flush=True)
    pip = [str(PY), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--upgrade", "pip"], check=True)
    constraints = _lock_constraints()
    subprocess.run([*pip, "install", "-c", str(constraints), "-e", f"{ROOT}[dev]"], check=True)
    STAMP.write_text(_fingerprint())


def _run(*argv: str) -> int:
    return subprocess.run(list(argv), cwd=ROOT, check=False).returncode


def _exec(*argv: str) -> int:
    """Become the command: Ctrl-C and SIGTERM then reach it directly, so it can stop what
    it started (subprocess.run would SIGKILL it on Ctrl-C and orphan its children)."""
    os.chdir(ROOT)
    sys.stdout.flush()
    os.execv(argv[0], list(argv))  # noqa: S606 - fixed argv, no shell by design


def check() -> int:
    for step in (
        [str(BIN / "ruff"), "check", "."],
        [str(BIN / "ruff"), "format", "--check", "."],
        [str(BIN / "mypy")],
    ):
        print("$", " ".join(Path(step[0]).name if i == 0 else a for i, a in enumerate(step)))
        if rc := _run(*step):
            return rc
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in {"dev", "test", "check", "bench", "broker"}:
        print(USAGE)
        return 2
    ensure_venv()
    if command == "dev":
        return _exec(str(BIN / "broker"), "dev", *rest)
    if command == "broker":
        return _exec(str(BIN / "broker"), *rest)
    if command == "check":
        return check()
    if command == "bench":
        return _exec(str(PY), "bench/credentials_bench.py", *rest)
    if rc := check():
        return rc
    print("$ pytest", *rest, flush=True)
    return _exec(str(PY), "-m", "pytest", *rest)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
