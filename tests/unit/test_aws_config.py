"""``broker configure``'s edit of ~/.aws/config: only its own keys in its own profile."""

from __future__ import annotations

import configparser
import shlex
import stat
from pathlib import Path

import pytest

from broker.client.aws_config import (
    credential_process_line,
    section_name,
    updated,
    write_profile,
)

VALUES = {"credential_process": "/usr/bin/broker credential-process", "region": "eu-west-1"}

USER_FILE = """\
# my settings
[default]
region = us-east-1

[profile work]
region = us-west-2
output = json
credential_process = old command
credential_process = duplicate

[profile other]
# keep me
output = text
"""


def test_a_new_profile_is_appended_and_nothing_else_changes() -> None:
    after = updated(USER_FILE, section="profile new", values=VALUES)
    assert after.startswith(USER_FILE)
    parsed = configparser.ConfigParser(strict=False)
    parsed.read_string(after)
    assert dict(parsed["profile new"]) == VALUES


def test_an_existing_profile_keeps_its_other_keys_and_the_rest_of_the_file() -> None:
    after = updated(USER_FILE, section="profile work", values=VALUES)
    parsed = configparser.ConfigParser(strict=False)
    parsed.read_string(after)
    assert dict(parsed["profile work"]) == {"output": "json", **VALUES}
    assert "# my settings" in after
    assert "# keep me" in after
    assert parsed["default"]["region"] == "us-east-1"
    assert parsed["profile other"]["output"] == "text"
    assert after.count("credential_process") == 1


def test_configure_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "aws" / "config"
    assert write_profile(path, profile="dev", values=VALUES) is True
    first = path.read_text()
    assert write_profile(path, profile="dev", values=VALUES) is False
    assert path.read_text() == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_configure_keeps_an_existing_files_mode(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text(USER_FILE)
    path.chmod(0o644)
    write_profile(path, profile="work", values=VALUES)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


@pytest.mark.parametrize("profile", ["", "a b", "x]", "a\nb", "p" * 65, "[profile]"])
def test_profile_names_that_would_break_the_file_are_refused(profile: str) -> None:
    with pytest.raises(ValueError, match="profile names"):
        section_name(profile)


def test_values_with_line_breaks_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="line break"):
        write_profile(tmp_path / "c", profile="x", values={"region": "a\n[default]"})


def test_the_default_profile_is_the_default_section() -> None:
    assert section_name("default") == "default"
    assert section_name("dev") == "profile dev"


def test_the_credential_process_line_splits_back_into_the_same_arguments() -> None:
    line = credential_process_line(
        "/opt/my tools/broker",
        broker="https://broker.example",
        role_arn="arn:aws:iam::123456789012:role/A",
        duration_seconds=900,
    )
    assert shlex.split(line) == [
        "/opt/my tools/broker",
        "credential-process",
        "--broker",
        "https://broker.example",
        "--role-arn",
        "arn:aws:iam::123456789012:role/A",
        "--duration",
        "900",
    ]
