"""``broker configure``: the ``~/.aws/config`` profile that runs ``credential-process``.

Idempotent and careful with the user's file: only the keys this command owns
(``credential_process``, ``region``) in the one profile section are replaced or added;
every other line, comment and section stays as it was. Written atomically, keeping the
file's mode (0600 for a new one).
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import tempfile
from pathlib import Path

CONFIG_FILE_ENV = "AWS_CONFIG_FILE"
_PROFILE_NAME_RE = re.compile(r"^[A-Za-z0-9_.@+-]{1,64}$")
_SECTION_RE = re.compile(r"^\[([^\]]+)\]\s*$")
# A key of the section itself starts at column 0; indented lines are a nested block's
# (``s3 =`` then ``  max_concurrent_requests = 5``). configparser folds key case and
# takes ``=`` or ``:``, so botocore does too.
_KEY_RE = re.compile(r"^([A-Za-z0-9_]+)\s*[=:]")


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


def _section_of(line: str) -> str | None:
    """The profile section a header line opens, as botocore reads it (it splits the name
    like a shell: ``[profile "work"]`` is ``profile work``)."""
    m = _SECTION_RE.match(line.strip())
    if not m:
        return None
    try:
        return " ".join(shlex.split(m.group(1)))
    except ValueError:
        return m.group(1).strip()


def updated(text: str, *, section: str, values: dict[str, str]) -> str:
    """``text`` with ``values`` set in ``[section]`` and nothing else changed (line
    endings included)."""
    lines = text.splitlines(keepends=True)
    newline = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
    start = next((i for i, line in enumerate(lines) if _section_of(line) == section), None)
    owned = {k.lower(): v for k, v in values.items()}
    if start is None:
        block = [f"[{section}]", *(f"{k} = {v}" for k, v in values.items())]
        head = "".join(lines)
        if head and not head.endswith(("\n", "\r")):
            head += newline
        if head.strip():
            head += newline
        return head + newline.join(block) + newline
    end = next(
        (i for i in range(start + 1, len(lines)) if _section_of(lines[i]) is not None),
        len(lines),
    )
    body: list[str] = []
    pending = dict(owned)
    for line in lines[start + 1 : end]:
        m = _KEY_RE.match(line)
        key = m.group(1).lower() if m else None
        if key in owned:
            if key in pending:
                body.append(f"{key} = {pending.pop(key)}{newline}")
            continue  # a repeated key we own: one is enough
        body.append(line)
    trailing: list[str] = []
    while body and not body[-1].strip():
        trailing.insert(0, body.pop())
    if body and not body[-1].endswith(("\n", "\r")):
        body[-1] += newline
    body += [f"{k} = {v}{newline}" for k, v in pending.items()]
    return "".join([*lines[: start + 1], *body, *trailing, *lines[end:]])


def write_profile(path: Path, *, profile: str, values: dict[str, str]) -> bool:
    """Set ``values`` in the profile; True when the file changed. A symlinked config
    stays a symlink: its target is what is rewritten."""
    section = section_name(profile)
    path = path.resolve()
    for value in values.values():
        if "\n" in value or "\r" in value:
            raise ValueError("a config value cannot contain a line break")
    try:
        with path.open(newline="") as f:  # keep the file's own line endings
            before = f.read()
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        before, mode = "", 0o600
    after = updated(before, section=section, values=values)
    if after == before:
        return False
    try:
        # What botocore does with the file: if this fails, nothing is written.
        configparser.RawConfigParser().read_string(after)
    except configparser.Error as exc:
        raise ValueError(
            f"{path} would not parse after the change ({exc.message}); fix it by hand first"
        ) from None
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".config-")
    try:
        with os.fdopen(fd, "w", newline="") as out:
            os.fchmod(out.fileno(), mode)
            out.write(after)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return True
