"""The layer contract in pyproject.toml ([tool.importlinter]) holds, and would catch a
module that reaches up a layer or closes a cycle.

import-linter builds the import graph (grimp) of the package it finds first on the
path, so the negative cases run it on a copy of ``broker`` with one import added.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(package_parent: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=package_parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_broker_keeps_its_layers_and_has_no_cycles() -> None:
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "added", "broken"),
    [
        # The configuration reaching up into the renderer: a cycle through policy.
        ("settings.py", "from broker import policy", "layers"),
        # A domain module reaching up to the web.
        ("rules.py", "from broker.web import api", "layers"),
        # Two siblings of one layer importing each other.
        ("http.py", "from broker import store", "layers"),
    ],
)
def test_a_import_against_the_layers_is_caught(
    tmp_path: Path, module: str, added: str, broken: str
) -> None:
    shutil.copytree(ROOT / "broker", tmp_path / "broker")
    target = tmp_path / "broker" / module
    source = target.read_text()
    anchor = "from __future__ import annotations\n"
    assert anchor in source
    target.write_text(source.replace(anchor, f"{anchor}\n{added}  # noqa\n", 1))
    done = lint_imports(tmp_path)
    assert done.returncode != 0, done.stdout
    assert f"{broken} BROKEN" in done.stdout
