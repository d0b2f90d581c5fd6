"""``broker configure``: the ``~/.aws/config`` profile that runs ``credential-process``.

Idempotent and careful with the user's file: only the keys this command owns
(``credential_process``, ``region``) in the one profile section are replaced or added;
every other line, comment and section stays as it was. Written atomically, keeping the
file's mode (0600 for a new one).
"""

from __future__ import annotations

import os
import re
import shlex
import tempfile
from pathlib import Path

CONFIG_FILE_ENV = "AWS_CONFIG_FILE"
_PROFILE_NAME_RE = re.compile(r"^[A-Za-z0-9_.@+-]{1,64}$")
_SECTION_RE = re.compile(r"^\s*\[([^\]]+)\]\s*$")
_KEY_RE = re.compile(r"^\s*([A-Za-z0-9_]+)\s*=")


def config_path() -> Path:
    explicit = os.environ.get(CONFIG_FILE_ENV)
    return Path(explicit).expanduser() if explicit else Path.home() / ".aws" / "config"


def section_name(profile: str) -> str:
    if not _PROFILE_NAME_RE.match(profile):
        raise ValueError("profile names are 1-64 of A-Z a-z 0-9 _ . @ + -")
    return "default" if profile == "default" else f"profile {profile}"


def credential_process_line(
    executable: str, *, broker: str, role_arn: str, duration_seconds: int | None
) -> str:
    argv = [executable, "credential-process", "--broker", broker, "--role-arn", role_arn]
    if duration_seconds:
        argv += ["--duration", str(duration_seconds)]
    # botocore splits the value like a POSIX shell does.
    return shlex.join(argv)


def updated(text: str, *, section: str, values: dict[str, str]) -> str:
    """``text`` with ``values`` set in ``[section]`` and nothing else changed."""
    lines = text.splitlines()
    start = next(
        (
            i
            for i, line in enumerate(lines)
            if (m := _SECTION_RE.match(line)) and m.group(1).strip() == section
        ),
        None,
    )
    if start is None:
        block = [f"[{section}]", *(f"{k} = {v}" for k, v in values.items())]
        if lines and lines[-1].strip():
            lines.append("")
        return "\n".join([*lines, *block]) + "\n"
    end = next((i for i in range(start + 1, len(lines)) if _SECTION_RE.match(lines[i])), len(lines))
    body: list[str] = []
    pending = dict(values)
    for line in lines[start + 1 : end]:
        m = _KEY_RE.match(line)
        if m and m.group(1) in values:
            if m.group(1) in pending:
                body.append(f"{m.group(1)} = {pending.pop(m.group(1))}")
            continue  # a repeated key we own: one is enough
        body.append(line)
    trailing: list[str] = []
    while body and not body[-1].strip():
        trailing.append(body.pop())
    body += [f"{k} = {v}" for k, v in pending.items()]
    return "\n".join([*lines[: start + 1], *body, *trailing, *lines[end:]]) + "\n"


def write_profile(path: Path, *, profile: str, values: dict[str, str]) -> bool:
    """Set ``values`` in the profile; True when the file changed."""
    section = section_name(profile)
    for value in values.values():
        if "\n" in value or "\r" in value:
            raise ValueError("a config value cannot contain a line break")
    try:
        before = path.read_text()
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        before, mode = "", 0o600
    after = updated(before, section=section, values=values)
    if after == before:
        return False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".config-")
    try:
        with os.fdopen(fd, "w") as out:
            os.fchmod(out.fileno(), mode)
            out.write(after)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return True
