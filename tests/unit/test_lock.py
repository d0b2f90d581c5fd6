"""requirements.lock and requirements-dev.lock stay in step with pyproject.toml and install.

The production install is ``pip install --require-hashes -r requirements.lock`` and
then the broker itself with ``--no-deps``; ``run.py`` builds the suite's virtualenv
the same way from requirements-dev.lock. These tests hold what that needs:

* every dependency in pyproject.toml (runtime in both locks, dev extras and the build
  backend in the dev lock) is pinned (``==``) at a version its specifier allows, with
  sha256 hashes;
* each lock holds exactly its closure (the pins of the packages its roots need, their
  extras included): the runtime lock nothing from the dev extras, the dev lock nothing
  stale, so pip in hash-checking mode finds every package it must install pinned and
  hashed;
* the dev lock pins every runtime package at the runtime lock's version and hashes, so
  the suite tests what production runs;
* every third-party module that broker/, bench/ and tests/ import comes from a locked
  distribution: nothing the suite needs floats or is installed by hand;
* the virtualenv the tests run in has exactly the dev lock's versions;
* pip itself accepts each lock: a ``--dry-run --require-hashes`` install resolves to
  exactly the pinned versions (integration: it asks the package index).

Recompile both with ``python3 run.py lock`` after changing the dependencies (README,
"Dependencies").
"""

from __future__ import annotations

import ast
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
DEV_LOCK = ROOT / "requirements-dev.lock"
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


def _pyproject() -> dict[str, object]:
    return tomllib.loads(PYPROJECT.read_text())


def runtime_requirements() -> list[Requirement]:
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    return [Requirement(text) for text in project["dependencies"]]


def dev_requirements() -> list[Requirement]:
    """What the dev lock must hold beyond the runtime: the dev extras and the build
    backend (run.py builds the editable install without isolation, from the lock)."""
    document = _pyproject()
    project, build = document["project"], document["build-system"]
    assert isinstance(project, dict)
    assert isinstance(build, dict)
    texts = [*project["optional-dependencies"]["dev"], *build["requires"]]
    return [Requirement(text) for text in texts]


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


# pip-compile --allow-unsafe pins pip too (pip-tools needs it); the venv's pip is
# installed from the dev lock like everything else.
_ALWAYS_IN_DEV_LOCK = frozenset({canonicalize_name("pip")})


@pytest.fixture(scope="module")
def pins() -> dict[NormalizedName, Pin]:
    return parse_lock(LOCK.read_text())


@pytest.fixture(scope="module")
def dev_pins() -> dict[NormalizedName, Pin]:
    return parse_lock(DEV_LOCK.read_text())


def _outside_specifiers(
    requirements: list[Requirement], pins: dict[NormalizedName, Pin]
) -> list[str]:
    problems = []
    for requirement in requirements:
        pin = pins.get(canonicalize_name(requirement.name))
        if pin is None:
            problems.append(f"{requirement.name} is not locked")
        elif not requirement.specifier.contains(pin.version, prereleases=True):
            problems.append(f"{pin.name}=={pin.version} is outside {requirement}")
    return problems


def test_every_runtime_dependency_is_pinned_within_its_specifier_with_hashes(
    pins: dict[NormalizedName, Pin],
) -> None:
    requirements = runtime_requirements()
    assert requirements, "pyproject.toml lists no runtime dependencies"
    assert _outside_specifiers(requirements, pins) == []


def test_every_dev_dependency_and_the_build_backend_are_pinned_within_their_specifiers(
    dev_pins: dict[NormalizedName, Pin],
) -> None:
    requirements = dev_requirements()
    assert len(requirements) > 10, "pyproject.toml lists no dev extras"
    assert _outside_specifiers([*runtime_requirements(), *requirements], dev_pins) == []


@pytest.mark.parametrize("path", [LOCK, DEV_LOCK], ids=lambda p: p.name)
def test_every_pin_has_hashes(path: Path) -> None:
    pins = parse_lock(path.read_text())
    assert pins
    assert [name for name, pin in pins.items() if not pin.hashes] == []


def test_the_lock_is_exactly_the_runtime_closure(pins: dict[NormalizedName, Pin]) -> None:
    needed = closure(runtime_requirements())
    missing = sorted(set(needed) - set(pins))
    extra = sorted(set(pins) - set(needed))
    assert missing == [], f"needed at run time but not locked: {missing}"
    assert extra == [], f"locked but not needed at run time (dev-only or stale): {extra}"


def test_the_dev_lock_is_exactly_the_closure_of_everything_the_suite_installs(
    dev_pins: dict[NormalizedName, Pin],
) -> None:
    needed = set(closure([*runtime_requirements(), *dev_requirements()]))
    needed |= _ALWAYS_IN_DEV_LOCK
    missing = sorted(needed - set(dev_pins))
    extra = sorted(set(dev_pins) - needed)
    assert missing == [], f"installed by the suite but not locked: {missing}"
    assert extra == [], f"locked but needed by nothing (stale): {extra}"


def test_the_dev_lock_pins_every_runtime_package_as_production_does(
    pins: dict[NormalizedName, Pin], dev_pins: dict[NormalizedName, Pin]
) -> None:
    differ = {
        name: f"runtime {pin.version}, dev {dev_pins[name].version if name in dev_pins else '-'}"
        for name, pin in pins.items()
        if name not in dev_pins
        or (dev_pins[name].version, set(dev_pins[name].hashes)) != (pin.version, set(pin.hashes))
    }
    assert differ == {}, "recompile both with `python3 run.py lock`"


def _imported_top_level_modules() -> set[str]:
    modules: set[str] = set()
    for folder in ("broker", "bench", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    modules.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    modules.add(node.module.split(".")[0])
    ours = {"broker", "bench", "tests", "__future__"}
    # _typeshed exists only for type checkers (imported under TYPE_CHECKING; mypy,
    # which is locked, ships it).
    return modules - set(sys.stdlib_module_names) - ours - {"_typeshed"}


def test_every_module_the_code_and_the_suite_import_comes_from_a_locked_distribution(
    dev_pins: dict[NormalizedName, Pin],
) -> None:
    modules = _imported_top_level_modules()
    # A guard against a walk that finds nothing: these are imported for certain.
    assert {"flask", "jwt", "redis", "pytest", "hypothesis"} <= modules
    providers = importlib.metadata.packages_distributions()
    unlocked = {
        module: providers.get(module, ["(no installed distribution)"])
        for module in sorted(modules)
        if not any(canonicalize_name(d) in dev_pins for d in providers.get(module, []))
    }
    assert unlocked == {}, "add the distribution to pyproject.toml, then `run.py lock`"


def test_the_venv_runs_the_locked_versions(dev_pins: dict[NormalizedName, Pin]) -> None:
    installed = {name: Version(importlib.metadata.version(name)) for name in dev_pins}
    differ = {
        name: f"installed {installed[name]}, locked {pin.version}"
        for name, pin in dev_pins.items()
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
@pytest.mark.parametrize("path", [LOCK, DEV_LOCK], ids=lambda p: p.name)
def test_pip_installs_the_lock_in_hash_checking_mode(path: Path, tmp_path: Path) -> None:
    pins = parse_lock(path.read_text())
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
            str(path),
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
