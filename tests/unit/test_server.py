"""broker.server's table of gunicorn refusals: every request error gunicorn can raise is
the client's (a 4xx), only the app's and the server's own faults are a 500, and the
answer is the broker's JSON shape. (tests/integration/test_gunicorn.py sends the raw
requests to a real gunicorn; this covers the kinds a default setup cannot produce, such
as the PROXY protocol ones, and any class a gunicorn upgrade adds.)"""

from __future__ import annotations

import inspect
import json
import ssl
import subprocess
import sys

import pytest
from gunicorn.http import errors as http_errors

from broker.server import error_bytes, gunicorn_options, refusal

MARKER = "M4RK3R"
# The app's fault (a response header it built) or the server's (its configuration).
SERVER_FAULTS: set[type[BaseException]] = {
    http_errors.InvalidResponseHeader,
    http_errors.InvalidResponseHeaderName,
    http_errors.ConfigurationProblem,
}
REQUEST_ERRORS = sorted(
    (
        cls
        for _, cls in inspect.getmembers(http_errors, inspect.isclass)
        if issubclass(cls, http_errors.ParseException)
        and cls is not http_errors.ParseException
        and cls not in SERVER_FAULTS
    ),
    key=lambda cls: cls.__name__,
)


def _instance(cls: type[BaseException]) -> BaseException:
    # Each takes one or two arguments: what gunicorn read from the client.
    params = len(inspect.signature(cls.__init__).parameters) - 1
    return cls(*([MARKER] * params))


@pytest.mark.parametrize("cls", REQUEST_ERRORS, ids=lambda cls: cls.__name__)
def test_every_request_error_gunicorn_raises_is_a_4xx(cls: type[BaseException]) -> None:
    status, code, message = refusal(_instance(cls))
    assert 400 <= status < 500
    assert code != "internal_error"
    assert message
    assert MARKER not in message  # the client's bytes are never quoted


@pytest.mark.parametrize("cls", sorted(SERVER_FAULTS, key=str), ids=lambda cls: cls.__name__)
def test_the_apps_and_servers_own_faults_are_a_500(cls: type[BaseException]) -> None:
    assert refusal(_instance(cls)) == (500, "internal_error", "internal error")


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        pytest.param(ssl.SSLError("handshake"), 400, id="tls-handshake"),
        pytest.param(http_errors.ForbiddenProxyRequest("10.0.0.1"), 403, id="proxy-forbidden"),
        pytest.param(RuntimeError("anything else"), 500, id="unexpected"),
    ],
)
def test_other_failures(exc: BaseException, status: int) -> None:
    assert refusal(exc)[0] == status


def test_the_answer_is_the_brokers_json_and_closes_the_connection() -> None:
    raw = error_bytes(431, "headers_too_large", "too large", "rid-1")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0] == "HTTP/1.1 431 Request Header Fields Too Large"
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert headers["Connection"] == "close"
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Request-Id"] == "rid-1"
    assert int(headers["Content-Length"]) == len(body)
    assert json.loads(body) == {
        "error": "headers_too_large",
        "message": "too large",
        "request_id": "rid-1",
    }


@pytest.mark.parametrize(
    ("worker_class", "path"),
    [
        ("gthread", "broker.server.ThreadWorker"),
        ("gevent", "broker.server.GeventWorker"),
    ],
)
def test_the_worker_class_setting_picks_the_gunicorn_worker(worker_class: str, path: str) -> None:
    assert gunicorn_options("127.0.0.1:0", 1, 4, worker_class=worker_class)["worker_class"] == path


@pytest.mark.parametrize("worker_class", ["eventlet", "", "GEVENT", "sync"])
def test_an_unknown_worker_class_is_refused(worker_class: str) -> None:
    with pytest.raises(ValueError, match=r"server\.worker_class must be one of gevent, gthread"):
        gunicorn_options("127.0.0.1:0", 1, 4, worker_class=worker_class)


@pytest.mark.parametrize(
    "statement",
    [
        "import broker.server",
        # `broker serve` up to where gunicorn starts (the config file is missing here).
        "import broker.cli; broker.cli.main(['serve', '--config', '/nonexistent.toml'])",
    ],
)
def test_the_gunicorn_master_imports_no_network_library(statement: str) -> None:
    """gunicorn's gevent worker patches the standard library after the fork; a library
    the master imported before it (urllib3 and botocore take names from ssl, redis-py
    from socket) would keep the unpatched ones: ssl then recurses and fails to boot."""
    code = (
        f"import sys; {statement}; "
        "print(sorted(m for m in ('urllib3', 'botocore', 'redis', 'requests') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
