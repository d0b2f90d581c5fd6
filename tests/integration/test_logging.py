"""The audit trail reaches stderr as JSON lines, under plain gunicorn too."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import logs, wsgi
from broker.devstack.stack import Stack, dump_toml

pytestmark = pytest.mark.integration


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    logs.stop()
    root.handlers[:] = handlers
    root.setLevel(level)


def _lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.usefixtures("restore_logging")
def test_audit_records_are_written_as_json_lines(capfd: pytest.CaptureFixture[str]) -> None:
    logs.configure("info")
    logging.getLogger("broker.audit").info(
        "credentials issued", extra={"audit": {"event": "credentials_issued", "rule": "r1"}}
    )
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("broker.web").exception("unhandled error")
    logging.getLogger("broker.debugging").debug("not at info level")
    logs.stop()  # flushes the writer thread

    lines = _lines(capfd.readouterr().err)
    assert [line["message"] for line in lines] == ["credentials issued", "unhandled error"]
    audit, error = lines
    assert audit["event"] == "credentials_issued"
    assert audit["rule"] == "r1"
    assert audit["level"] == "info"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(audit["time"]))
    assert "ValueError: boom" in str(error["exception"])


@pytest.mark.usefixtures("restore_logging")
def test_the_wsgi_entry_point_configures_the_audit_log(
    stack: Stack,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "broker.toml"
    config.write_text(dump_toml(stack.config("http://127.0.0.1:8000")))
    monkeypatch.setenv("BROKER_CONFIG", str(config))
    monkeypatch.setenv("BROKER_SERVER__LOG_LEVEL", "info")
    logging.getLogger().handlers[:] = []
    logging.getLogger().setLevel(logging.WARNING)

    app = wsgi.create_app()
    logging.getLogger("broker.audit").info("probe", extra={"audit": {"event": "probe"}})
    app.extensions["broker"].close()
    logs.stop()

    assert [line["event"] for line in _lines(capfd.readouterr().err)] == ["probe"]
