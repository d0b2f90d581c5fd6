"""Readers for the recipes in deploy/, so the tests check the files as shipped (the
image's start command, its paths, the unit's ExecStart) instead of restating them."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
KUBERNETES = DEPLOY / "kubernetes"
SYSTEMD_UNIT = DEPLOY / "broker.service"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"no {keyword} in stage {self.name or self.base}"
        return found[-1]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for rest in self.all("ENV"):
            for item in shlex.split(rest):
                key, sep, value = item.partition("=")
                assert sep, f"ENV must use KEY=VALUE form, got {item!r}"
                out[key] = value
        return out

    def exec_form(self, keyword: str) -> list[str]:
        value = json.loads(self.last(keyword))
        assert isinstance(value, list), f"{keyword} must be in exec (JSON array) form"
        return [str(v) for v in value]

    def start_command(self) -> list[str]:
        """ENTRYPOINT + CMD, as the container runtime runs them."""
        return self.exec_form("ENTRYPOINT") + self.exec_form("CMD")

    def healthcheck(self) -> tuple[dict[str, str], list[str]]:
        """The HEALTHCHECK options and its exec-form command."""
        options, sep, command = self.last("HEALTHCHECK").partition(" CMD ")
        assert sep, "HEALTHCHECK must be `HEALTHCHECK [OPTIONS] CMD [...]`"
        opts = dict(o.removeprefix("--").split("=", 1) for o in options.split())
        argv = json.loads(command)
        assert isinstance(argv, list)
        return opts, [str(a) for a in argv]


def read_dockerfile(text: str | None = None) -> list[Stage]:
    """Stages with their instructions: continuation lines joined, comments dropped."""
    source = DOCKERFILE.read_text() if text is None else text
    logical: list[str] = []
    pending = ""
    for line in source.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = " ".join(rest.split())
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
    return stages


def runtime_stage() -> Stage:
    return read_dockerfile()[-1]


def read_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def read_manifests() -> dict[str, dict[str, Any]]:
    """Every Kubernetes manifest of the base, by kind."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        doc = yaml.safe_load(path.read_text())
        assert isinstance(doc, dict), path
        assert doc["kind"] not in out, path
        out[doc["kind"]] = doc
    return out


def read_unit(text: str | None = None) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit: section -> (key, value) in order (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in (SYSTEMD_UNIT.read_text() if text is None else text).splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def unit_values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]
