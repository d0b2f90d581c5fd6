#!/usr/bin/env python3
"""Bootstrap and entry point: `python3 run.py dev` and `python3 run.py test`.

Needs nothing but Python 3.11+: it creates `.venv/` beside this file, installs
exactly what requirements-dev.lock pins (every package with its sha256 hashes, the
runtime pins of requirements.lock among them), then the broker itself, and re-installs
only when pyproject.toml or a lock changes. Nothing floats: a release upstream reaches
the suite only through `python3 run.py lock --upgrade`, which runs the gate on it.
"""

from __future__ import annotations

import argparse
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
  lock    recompile requirements.lock and requirements-dev.lock from pyproject.toml,
          keeping every pin that still fits (after editing the dependencies)
          --upgrade: take the newest releases, reinstall and run the gate on them
          --upgrade-package NAME: take the newest NAME only (repeatable)
"""


LOCK = ROOT / "requirements.lock"
DEV_LOCK = ROOT / "requirements-dev.lock"
COMMANDS = {"dev", "test", "check", "bench", "broker", "lock"}


def _fingerprint() -> str:
    digest = hashlib.sha256()
    for path in (ROOT / "pyproject.toml", LOCK, DEV_LOCK):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def ensure_venv() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - run.py may be started by an old python3
        sys.exit(f"Python 3.11+ is required, this is {sys.version.split()[0]}")
    if not PY.exists():
        print(f"creating virtualenv in {VENV} ...", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    if STAMP.exists() and STAMP.read_text() == _fingerprint():
        return
    print("installing the broker and its dev dependencies from the locks ...", flush=True)
    pip = [str(PY), "-m", "pip", "--disable-pip-version-check", "-q"]
    # Hash-checking mode: pip refuses any package the lock does not pin with a hash, so
    # an incomplete lock fails here rather than quietly taking a new release. pip and
    # setuptools are pinned in the lock too; without build isolation the editable
    # install builds with the locked setuptools instead of fetching the newest.
    subprocess.run([*pip, "install", "--require-hashes", "-r", str(DEV_LOCK)], check=True)
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-build-isolation", "-e", str(ROOT)], check=True
    )
    STAMP.write_text(_fingerprint())


def _compile_env() -> dict[str, str]:
    """pip-compile against the package index alone: no local wheel folders or mirrors
    from this machine's pip configuration end up in the locks' hashes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def lock(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python3 run.py lock")
    parser.add_argument("--upgrade", action="store_true", help="take the newest releases")
    parser.add_argument("--upgrade-package", action="append", default=[], metavar="NAME")
    options = parser.parse_args(args)
    upgrade, packages = options.upgrade, options.upgrade_package
    compile_ = [
        str(BIN / "pip-compile"),
        "--quiet",
        "--generate-hashes",
        "--strip-extras",
        "--no-emit-index-url",
        "--no-emit-find-links",
        *(["--upgrade"] if upgrade else []),
        *(arg for name in packages for arg in ("--upgrade-package", name)),
    ]
    steps = [
        [*compile_, "--output-file", LOCK.name, "pyproject.toml"],
        # The dev lock is constrained by the runtime lock, so the suite runs exactly
        # the versions production installs; it also pins pip and the build backend.
        [
            *compile_,
            "--allow-unsafe",
            "--all-build-deps",
            "--extra",
            "dev",
            "--constraint",
            LOCK.name,
            "--output-file",
            DEV_LOCK.name,
            "pyproject.toml",
        ],
    ]
    for step in steps:
        print("$ pip-compile", "... --output-file", step[step.index("--output-file") + 1])
        if rc := subprocess.run(step, cwd=ROOT, env=_compile_env(), check=False).returncode:
            return rc
    if not (upgrade or packages):
        return 0
    print("$ git diff --stat", flush=True)
    _run("git", "diff", "--stat", "--", LOCK.name, DEV_LOCK.name)
    ensure_venv()
    print("the locks moved: running the gate on the new versions", flush=True)
    return gate([])


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


def pytest_argv(args: list[str]) -> list[str]:
    """pytest with the suite spread over worker processes unless the caller chose (`-n`,
    or `-p no:xdist`). Twice as many workers as cores: most of the suite's wall time is
    spent waiting on subprocesses, sockets and fault drills' timeouts, not computing."""
    chosen = any(a in {"-n", "--numprocesses", "no:xdist"} or a.startswith("-n") for a in args)
    workers = [] if chosen else ["-n", os.environ.get("BROKER_TEST_WORKERS", str(2 * _cores()))]
    return [str(PY), "-m", "pytest", *workers, *args]


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def gate(pytest_args: list[str]) -> int:
    if rc := check():
        return rc
    argv = pytest_argv(pytest_args)
    print("$ pytest", *argv[3:], flush=True)
    return _run(*argv)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(USAGE)
        return 2
    ensure_venv()
    if command == "dev":
        return _exec(str(BIN / "broker"), "dev", *rest)
    if command == "broker":
        return _exec(str(BIN / "broker"), *rest)
    if command == "check":
        return check()
    if command == "lock":
        return lock(rest)
    if command == "bench":
        return _exec(str(PY), "bench/credentials_bench.py", *rest)
    if rc := check():
        return rc
    argv = pytest_argv(rest)
    print("$ pytest", *argv[3:], flush=True)
    # exec, not gate(): Ctrl-C then reaches pytest, which stops what the tests started.
    return _exec(*argv)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
