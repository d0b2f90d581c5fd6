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


@pytest.mark.parametrize(
    ("before", "expected_region_lines"),
    [
        ("[profile work]\nRegion = us-east-1\n", 1),
        ("[profile work]\nregion: us-east-1\n", 1),
        ('[profile "work"]\nregion = us-east-1\n', 1),
        ("[profile work]\ns3 =\n  region = nested\n  max_concurrent_requests = 5\n", 2),
    ],
)
def test_keys_are_read_as_botocore_reads_them(before: str, expected_region_lines: int) -> None:
    after = updated(before, section="profile work", values=VALUES)
    parsed = configparser.RawConfigParser()
    parsed.read_string(after)  # strict: a second region would be an error here
    assert len(parsed.sections()) == 1
    section = parsed[parsed.sections()[0]]
    assert section["region"] == "eu-west-1"
    assert sum("region" in line.lower() for line in after.splitlines()) == expected_region_lines
    if "s3" in section:
        assert "max_concurrent_requests = 5" in section["s3"]


def test_crlf_files_keep_their_line_endings(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_bytes(b"[default]\r\nregion = us-east-1\r\n")
    write_profile(path, profile="work", values=VALUES)
    raw = path.read_bytes()
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert raw.startswith(b"[default]\r\nregion = us-east-1\r\n")


def test_a_symlinked_config_stays_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "dotfiles" / "aws-config"
    target.parent.mkdir()
    target.write_text("[default]\nregion = us-east-1\n")
    link = tmp_path / "config"
    link.symlink_to(target)
    write_profile(link, profile="work", values=VALUES)
    assert link.is_symlink()
    assert "[profile work]" in target.read_text()


def test_a_file_that_would_not_parse_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "config"
    broken = "[default]\nregion = a\nregion = b\n"
    path.write_text(broken)
    with pytest.raises(ValueError, match="would not parse"):
        write_profile(path, profile="work", values=VALUES)
    assert path.read_text() == broken
