"""The broker under real gunicorn (``broker serve``, the worker and logger classes of
``broker.server``), spoken to over raw sockets: every answer is the broker's JSON.

* gunicorn's own parser refusals (one row per kind of malformed request) come back as
  ``{"error", "message", "request_id"}`` with a 4xx status, ``Content-Type:
  application/json``, ``Connection: close`` and an ``X-Request-Id``, and echo none of
  the client's bytes (a marker in each request is looked for in the whole answer);
* a chunked body with a bad chunk size is a 400 (it was a 500), and closes the
  connection;
* a 413 closes the connection, so the client knows to send its next request on a new
  one instead of losing it.
"""

from __future__ import annotations

import json
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from broker.devstack.processes import free_port
from broker.devstack.stack import DEV_PROVIDER, Stack, dump_toml
from broker.settings import WORKER_CLASSES
from tests.integration.test_serve import wait_until_ready

pytestmark = pytest.mark.integration

MARKER = b"M4RK3R"
CREDENTIALS = "/v1/credentials"


@dataclass
class Served:
    port: int
    url: str
    stderr: Path


def broker_config(stack: Stack, url: str, path: Path, *, worker_class: str) -> Path:
    config = stack.config(url)
    config["server"]["worker_class"] = worker_class
    config["redis"]["key_prefix"] = f"gunicorn-{secrets.token_hex(4)}:"
    config["rate_limit"] = {"per_ip_per_minute": 0, "per_identity_per_minute": 0}
    path.write_text(dump_toml(config))
    return path


# Every test here runs under each worker model [server] worker_class offers.
@pytest.fixture(scope="module", params=sorted(WORKER_CLASSES))
def served(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Served]:
    workdir = tmp_path_factory.mktemp("gunicorn")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = broker_config(stack, url, workdir / "broker.toml", worker_class=request.param)
    stderr = workdir / "stderr.log"
    with stderr.open("w") as err:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "broker.cli",
                "serve",
                "--config",
                str(config),
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                "1",
                "--threads",
                "4",
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            wait_until_ready(url, process, stderr)
            yield Served(port=port, url=url, stderr=stderr)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)


# --------------------------------------------------------------------------- raw HTTP


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes
    closed: bool  # the server closed the connection after the answer

    def json(self) -> Any:
        return json.loads(self.body)


def read_answer(sock: socket.socket) -> Answer:
    """One HTTP/1.1 answer (Content-Length framed), and whether the connection closed
    after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before an answer: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        assert name.lower() not in headers, f"{name} twice"
        headers[name.lower()] = value.strip()
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        rest += chunk
    body, extra = rest[:length], rest[length:]
    assert not extra, extra
    closed = False
    if headers.get("connection") == "close":
        sock.settimeout(5)
        try:
            closed = sock.recv(1) == b""
        except ConnectionResetError:
            closed = True
    return Answer(
        status=int(status_line.split(" ")[1]),
        headers=headers,
        body=body,
        raw=data[: len(head) + 4] + body,
        closed=closed,
    )


def exchange(port: int, raw: bytes) -> Answer:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(raw)
        return read_answer(sock)


def assert_json_error(answer: Answer, status: int, code: str) -> dict[str, Any]:
    assert answer.status == status, answer.raw
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers.get("cache-control") == "no-store"
    body = answer.json()
    assert set(body) == {"error", "message", "request_id"}, body
    assert body["error"] == code, body
    assert body["request_id"] == answer.headers["x-request-id"]
    assert b"<html" not in answer.raw.lower()
    return dict(body)


GET = b"GET /healthz HTTP/1.1\r\nHost: broker\r\n"
POST = b"POST /v1/credentials HTTP/1.1\r\nHost: broker\r\nContent-Type: application/json\r\n"

# (raw request, status, code): every kind of request gunicorn's parser refuses. Each
# carries MARKER where gunicorn's own answer or log line would have quoted it.
PARSER_REFUSALS = {
    "expect-not-100-continue": (
        POST + b"Expect: " + MARKER + b"\r\nContent-Length: 2\r\n\r\n{}",
        417,
        "expectation_failed",
    ),
    "nul-in-header-value": (GET + b"X-Test: a\x00" + MARKER + b"\r\n\r\n", 400, "invalid_request"),
    "cr-in-header-value": (GET + b"X-Test: a\r" + MARKER + b"\r\n\r\n", 400, "invalid_request"),
    "content-length-not-a-number": (
        POST + b"Content-Length: 2" + MARKER + b"\r\n\r\n{}",
        400,
        "invalid_request",
    ),
    "content-length-negative": (POST + b"Content-Length: -2\r\n\r\n{}", 400, "invalid_request"),
    "content-length-twice-different": (
        POST + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        400,
        "invalid_request",
    ),
    "content-length-and-chunked": (
        POST + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        400,
        "invalid_request",
    ),
    "unsupported-transfer-coding": (
        POST + b"Transfer-Encoding: " + MARKER + b"\r\n\r\n",
        400,
        "invalid_request",
    ),
    "chunked-on-http-1.0": (
        b"POST /v1/credentials HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "invalid_request",
    ),
    "9kb-header-line": (
        GET + b"X-Test: " + MARKER + b"a" * 9 * 1024 + b"\r\n\r\n",
        431,
        "headers_too_large",
    ),
    "too-many-headers": (
        GET + b"".join(b"X-%d: " % n + MARKER + b"\r\n" for n in range(150)) + b"\r\n",
        431,
        "headers_too_large",
    ),
    "9kb-request-line": (
        b"GET /" + MARKER + b"a" * 9 * 1024 + b" HTTP/1.1\r\nHost: broker\r\n\r\n",
        414,
        "uri_too_long",
    ),
    "obsolete-line-folding": (
        GET + b"X-Test: a\r\n " + MARKER + b"\r\n\r\n",
        400,
        "invalid_request",
    ),
    "header-name-with-space": (GET + b"X " + MARKER + b": a\r\n\r\n", 400, "invalid_request"),
    "header-without-colon": (GET + MARKER + b"\r\n\r\n", 400, "invalid_request"),
    "bad-method": (b"G(" + MARKER + b" / HTTP/1.1\r\nHost: broker\r\n\r\n", 400, "invalid_request"),
    "lowercase-method": (b"get / HTTP/1.1\r\nHost: broker\r\n\r\n", 400, "invalid_request"),
    "http2-preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "invalid_request"),
    "request-line-garbage": (MARKER + b"\r\n\r\n", 400, "invalid_request"),
    "http-version-unknown": (
        b"GET / HTTP/7." + MARKER + b"\r\nHost: broker\r\n\r\n",
        400,
        "invalid_request",
    ),
    "http-version-2": (b"GET / HTTP/2.0\r\nHost: broker\r\n\r\n", 400, "invalid_request"),
    "uri-with-space": (
        b"GET /a " + MARKER + b" b HTTP/1.1\r\nHost: broker\r\n\r\n",
        400,
        "invalid_request",
    ),
}


@pytest.mark.parametrize(
    ("raw", "status", "code"), PARSER_REFUSALS.values(), ids=PARSER_REFUSALS.keys()
)
def test_parser_refusals_are_the_brokers_json_and_echo_nothing(
    served: Served, raw: bytes, status: int, code: str
) -> None:
    answer = exchange(served.port, raw)

    body = assert_json_error(answer, status, code)
    assert answer.headers["connection"] == "close"
    assert answer.closed
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert len(body["request_id"]) == 32
    assert MARKER not in answer.raw
    log = logged(served, body["request_id"])
    assert MARKER.decode() not in log


def logged(served: Served, text: str) -> str:
    """The server's log once ``text`` is in it (lines are written by a log thread)."""
    deadline = time.monotonic() + 10
    while text not in (log := served.stderr.read_text()):
        assert time.monotonic() < deadline, log
        time.sleep(0.1)
    return log


def test_parser_refusals_are_logged_as_json_lines_with_their_request_id(served: Served) -> None:
    answer = exchange(served.port, GET + b"X-Test: a\x00b\r\n\r\n")
    rid = answer.json()["request_id"]

    [line] = [json.loads(text) for text in logged(served, rid).splitlines() if rid in text]
    assert line["logger"] == "gunicorn.error"
    assert line["level"] == "warning"
    assert line["request_id"] == rid
    assert "InvalidHeader" in line["message"]


def _chunked(body: bytes) -> bytes:
    return POST + b"Transfer-Encoding: chunked\r\n\r\n" + body


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"zz\r\n{}\r\n0\r\n\r\n", id="size-not-hex"),
        pytest.param(b"2" + MARKER + b"\r\n{}\r\n0\r\n\r\n", id="size-with-junk"),
        pytest.param(b"-2\r\n{}\r\n0\r\n\r\n", id="size-negative"),
        pytest.param(b"2\r\n{}XX0\r\n\r\n", id="chunk-missing-terminator"),
        pytest.param(b"2;" + MARKER + b"\x00\r\n{}\r\n0\r\n\r\n", id="bad-chunk-extension"),
    ],
)
def test_a_malformed_chunked_body_is_a_400_that_closes_the_connection(
    served: Served, body: bytes
) -> None:
    answer = exchange(served.port, _chunked(body))

    assert_json_error(answer, 400, "invalid_request")
    assert answer.headers["connection"] == "close"
    assert answer.closed
    assert MARKER not in answer.raw


def test_a_well_formed_chunked_body_still_works(served: Served) -> None:
    answer = exchange(served.port, _chunked(b"2\r\n{}\r\n0\r\n\r\n"))
    # An empty object reaches the app and is refused by it, as JSON.
    assert_json_error(answer, 400, "invalid_request")
    assert "provider is required" in answer.json()["message"]


def test_a_413_closes_the_connection(served: Served) -> None:
    too_large = b'{"token": "' + b"x" * 200 * 1024 + b'"}'
    with socket.create_connection(("127.0.0.1", served.port), timeout=15) as sock:
        sock.sendall(POST + b"Content-Length: %d\r\n\r\n" % len(too_large))
        sock.sendall(too_large[: 8 * 1024])  # the rest would follow: the answer comes first
        answer = read_answer(sock)

    assert_json_error(answer, 413, "request_too_large")
    assert answer.headers["connection"] == "close"
    assert answer.closed


def test_a_413_for_a_chunked_body_closes_the_connection(served: Served) -> None:
    chunk = b"x" * 1024
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(80)) + b"0\r\n\r\n"
    answer = exchange(served.port, _chunked(body))
    assert_json_error(answer, 413, "request_too_large")
    assert answer.headers["connection"] == "close"
    assert answer.closed


def test_keep_alive_still_serves_the_next_request(served: Served) -> None:
    """The control: an ordinary answer keeps the connection, and a second request on
    it is answered."""
    with socket.create_connection(("127.0.0.1", served.port), timeout=15) as sock:
        sock.sendall(GET + b"\r\n")
        first = read_answer(sock)
        sock.sendall(GET + b"X-Request-Id: second-one\r\n\r\n")
        second = read_answer(sock)
    assert first.status == second.status == 200
    assert first.headers["connection"] == "keep-alive"
    assert second.headers["x-request-id"] == "second-one"


def test_issuance_under_gunicorn_logs_the_request_id(served: Served, stack: Stack) -> None:
    from broker.devstack.oidc_login import login
    from broker.devstack.stack import DEV_CLIENT_ID

    nonce = secrets.token_urlsafe(8)
    token = login(stack.oidc.url, subject="bob", client_id=DEV_CLIENT_ID, nonce=nonce).id_token
    rid = f"gunicorn-{secrets.token_hex(6)}"
    response = requests.post(
        f"{served.url}{CREDENTIALS}",
        json={"provider": DEV_PROVIDER, "token": token, "nonce": nonce},
        headers={"X-Request-Id": rid},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.headers["X-Request-Id"] == rid

    log = logged(served, rid)
    lines = [json.loads(t) for t in log.splitlines() if rid in t]
    assert [line["event"] for line in lines] == ["credentials_issued"]
    assert token not in log
