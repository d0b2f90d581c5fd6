"""requirements.lock stays in step with pyproject.toml and installs.

The production install is ``pip install --require-hashes -r requirements.lock`` and
then the broker itself with ``--no-deps``. These tests hold what that needs:

* every runtime dependency in pyproject.toml is pinned (``==``) in the lock at a
  version its specifier allows, with sha256 hashes;
* the lock holds exactly the runtime dependency closure (the pins of the packages the
  runtime dependencies need, their extras included, and nothing from the dev extras),
  so pip in hash-checking mode finds every package it must install pinned and hashed;
* the virtualenv the tests run in has exactly the locked versions (``run.py`` installs
  it constrained to the lock), so the suite tests what production runs;
* pip itself accepts the lock: a ``--dry-run --require-hashes`` install resolves to
  exactly the pinned versions (integration: it asks the package index).

Regenerate the lock after changing the runtime dependencies (README, "Dependencies").
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"

_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})\Z")


@dataclass(frozen=True)
class Pin:
    name: NormalizedName
    version: Version
    hashes: tuple[str, ...]


def parse_lock(text: str) -> dict[NormalizedName, Pin]:
    """The lock's pins; anything but ``name==version [; marker]`` plus hashes is refused."""
    pins: dict[NormalizedName, Pin] = {}
    logical = re.sub(r"\\\n", " ", text)
    for raw_line in logical.splitlines():
        line = raw_line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-"):
            raise AssertionError(f"pip option in the lock (keep it to pins): {line[:60]}")
        requirement_text, *options = line.split(" --hash=")
        requirement = Requirement(requirement_text.strip())
        specifiers = list(requirement.specifier)
        assert len(specifiers) == 1, f"{requirement.name}: not one pin"
        assert specifiers[0].operator == "==", f"{requirement.name}: not pinned with =="
        hashes = tuple(_HASH.match("--hash=" + option.strip()) for option in options)
        assert all(hashes), f"{requirement.name}: a hash that is not sha256 hex"
        name = canonicalize_name(requirement.name)
        assert name not in pins, f"{name} pinned twice"
        pins[name] = Pin(
            name=name,
            version=Version(specifiers[0].version),
            hashes=tuple(h[1] for h in hashes if h),
        )
    return pins


def runtime_requirements() -> list[Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    return [Requirement(text) for text in project["dependencies"]]


def closure(roots: list[Requirement]) -> dict[NormalizedName, set[str]]:
    """Every distribution the roots need in this environment, with the extras asked of it
    (from the installed packages' metadata, which test_the_venv_runs_the_locked_versions
    ties to the lock)."""
    needed: dict[NormalizedName, set[str]] = {}
    pending = list(roots)
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        known = needed.get(name)
        if known is not None and requirement.extras <= known:
            continue
        extras = (known or set()) | set(requirement.extras)
        needed[name] = extras
        for text in importlib.metadata.requires(name) or []:
            child = Requirement(text)
            if child.marker is None or any(
                child.marker.evaluate({"extra": extra}) for extra in (extras or {""})
            ):
                pending.append(child)
    return needed


@pytest.fixture(scope="module")
def pins() -> dict[NormalizedName, Pin]:
    return parse_lock(LOCK.read_text())


def test_every_runtime_dependency_is_pinned_within_its_specifier_with_hashes(
    pins: dict[NormalizedName, Pin],
) -> None:
    requirements = runtime_requirements()
    assert requirements, "pyproject.toml lists no runtime dependencies"
    for requirement in requirements:
        pin = pins.get(canonicalize_name(requirement.name))
        assert pin is not None, f"{requirement.name} is not in requirements.lock"
        assert requirement.specifier.contains(pin.version, prereleases=True), (
            f"requirements.lock pins {pin.name}=={pin.version}, outside {requirement}"
        )
        assert pin.hashes, f"{pin.name} has no hash"


def test_every_pin_has_hashes(pins: dict[NormalizedName, Pin]) -> None:
    assert pins
    assert [name for name, pin in pins.items() if not pin.hashes] == []


def test_the_lock_is_exactly_the_runtime_closure(pins: dict[NormalizedName, Pin]) -> None:
    needed = closure(runtime_requirements())
    missing = sorted(set(needed) - set(pins))
    extra = sorted(set(pins) - set(needed))
    assert missing == [], f"needed at run time but not locked: {missing}"
    assert extra == [], f"locked but not needed at run time (dev-only or stale): {extra}"


def test_the_venv_runs_the_locked_versions(pins: dict[NormalizedName, Pin]) -> None:
    installed = {name: Version(importlib.metadata.version(name)) for name in pins}
    differ = {
        name: f"installed {installed[name]}, locked {pin.version}"
        for name, pin in pins.items()
        if installed[name] != pin.version
    }
    assert differ == {}, "rerun `python3 run.py check` to reinstall from the lock"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("flask>=3.0 \\\n    --hash=sha256:" + "a" * 64, "not pinned with =="),
        ("flask==3.1.3 \\\n    --hash=md5:abc", "not sha256 hex"),
        ("flask==3.1.3 \\\n    --hash=sha256:" + "a" * 63, "not sha256 hex"),
        ("--extra-index-url https://example.test/simple", "pip option in the lock"),
        ("flask==1 --hash=sha256:" + "a" * 64 + "\nFlask==1", "pinned twice"),
    ],
)
def test_the_lock_parser_refuses_what_pip_hash_mode_would(text: str, problem: str) -> None:
    # The checks above are only as good as this parser: it must not wave a bad lock through.
    with pytest.raises(AssertionError, match=problem):
        parse_lock(text)


@pytest.mark.integration
def test_pip_installs_the_lock_in_hash_checking_mode(
    pins: dict[NormalizedName, Pin], tmp_path: Path
) -> None:
    report = tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--require-hashes",
            "--quiet",
            "--report",
            str(report),
            "-r",
            str(LOCK),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    would_install = {
        canonicalize_name(item["metadata"]["name"]): Version(item["metadata"]["version"])
        for item in json.loads(report.read_text())["install"]
    }
    assert would_install == {name: pin.version for name, pin in pins.items()}
