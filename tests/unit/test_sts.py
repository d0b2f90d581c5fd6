"""BotocoreSTS against a local HTTP server speaking STS's query protocol.

Real sockets and botocore's real request and response handling; only the STS answers
are scripted, so every error code can be produced on demand.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import pytest
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from broker import errors, metrics
from broker.devstack.processes import free_port
from broker.settings import STSSettings
from broker.sts import AssumeRequest, BotocoreSTS

TOKEN = "eyJ.the-web-identity-token.sig"
ROLE = "arn:aws:iam::123456789012:role/Reader"
NS = "https://sts.amazonaws.com/doc/2011-06-15/"

SUCCESS = f"""<AssumeRoleWithWebIdentityResponse xmlns="{NS}">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>user-1</SubjectFromWebIdentityToken>
    <Audience>client-1</Audience>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::123456789012:assumed-role/Reader/alice</Arn>
      <AssumedRoleId>AROAEXAMPLE:alice</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <SessionToken>session-token</SessionToken>
      <SecretAccessKey>secret-key</SecretAccessKey>
      <Expiration>2030-01-02T03:04:05Z</Expiration>
      <AccessKeyId>ASIAEXAMPLE</AccessKeyId>
    </Credentials>
    <Provider>accounts.google.com</Provider>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata><RequestId>req-1</RequestId></ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>"""


def error_document(code: str, message: str) -> str:
    return (
        f'<ErrorResponse xmlns="{NS}"><Error><Type>Sender</Type><Code>{code}</Code>'
        f"<Message>{message}</Message></Error><RequestId>req-1</RequestId></ErrorResponse>"
    )


@dataclass
class Answer:
    status: int
    body: str
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


OK = Answer(200, SUCCESS)


class FakeSTS:
    """Answers from a script (then success); records every request it receives."""

    def __init__(self) -> None:
        self.script: list[Answer] = []
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def app(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        form = {k: v[0] for k, v in parse_qs(request.get_data(as_text=True)).items()}
        with self._lock:
            self.requests.append({"form": form, "headers": dict(request.headers)})
            answer = self.script.pop(0) if self.script else OK
        time.sleep(answer.delay)
        response = Response(answer.body, status=answer.status, content_type="text/xml")
        response.headers.update(answer.headers)
        return response(environ, start_response)

    def reset(self, *script: Answer) -> None:
        with self._lock:
            self.script = list(script)
            self.requests.clear()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeSTS]:
    server = FakeSTS()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _fresh_script(fake: FakeSTS) -> None:
    fake.reset()


@pytest.fixture(scope="module")
def sts(fake: FakeSTS) -> Iterator[BotocoreSTS]:
    # One client for the module, as in the broker: it holds no per-call state.
    client = BotocoreSTS(settings(fake.url), retry_base_seconds=0.001)
    yield client
    client.close()


def settings(url: str, *, timeout: float = 2.0, max_attempts: int = 3) -> STSSettings:
    return STSSettings(
        region="us-east-1", endpoint_url=url, timeout_seconds=timeout, max_attempts=max_attempts
    )


def assume(**overrides: Any) -> AssumeRequest:
    base = AssumeRequest(
        role_arn=ROLE,
        session_name="alice@example.com",
        web_identity_token=TOKEN,
        provider_id=None,
        duration_seconds=3600,
        policy=None,
        policy_arns=(),
    )
    return replace(base, **overrides)


# --------------------------------------------------------------------------- success


def test_parses_credentials_and_sends_an_unsigned_minimal_request(
    fake: FakeSTS, sts: BotocoreSTS
) -> None:
    issued = sts.assume_role_with_web_identity(assume())

    assert issued.access_key_id == "ASIAEXAMPLE"
    assert issued.secret_access_key == "secret-key"
    assert issued.session_token == "session-token"
    assert issued.expiration == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert issued.expiration.utcoffset() is not None
    assert issued.assumed_role_arn == "arn:aws:sts::123456789012:assumed-role/Reader/alice"
    assert issued.assumed_role_id == "AROAEXAMPLE:alice"
    assert "secret-key" not in repr(issued)

    [sent] = fake.requests
    assert sent["form"] == {
        "Action": "AssumeRoleWithWebIdentity",
        "Version": "2011-06-15",
        "RoleArn": ROLE,
        "RoleSessionName": "alice@example.com",
        "WebIdentityToken": TOKEN,
        "DurationSeconds": "3600",
    }
    # The broker holds no AWS keys: nothing is signed.
    assert "Authorization" not in sent["headers"]
    assert "X-Amz-Security-Token" not in sent["headers"]


def test_passes_provider_id_policy_and_policy_arns(fake: FakeSTS, sts: BotocoreSTS) -> None:
    policy = '{"Version":"2012-10-17","Statement":[]}'
    arns = ("arn:aws:iam::aws:policy/ReadOnlyAccess", "arn:aws:iam::123456789012:policy/p")
    sts.assume_role_with_web_identity(
        assume(provider_id="www.amazon.com", policy=policy, policy_arns=arns)
    )

    form = fake.requests[0]["form"]
    assert form["ProviderId"] == "www.amazon.com"
    assert form["Policy"] == policy
    assert form["PolicyArns.member.1.arn"] == arns[0]
    assert form["PolicyArns.member.2.arn"] == arns[1]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("answer", "expected", "attempts"),
    [
        ((400, "InvalidIdentityToken"), errors.InvalidToken, 1),
        ((400, "ExpiredTokenException"), errors.ExpiredToken, 1),
        ((403, "IDPRejectedClaim"), errors.AccessDenied, 1),
        ((403, "AccessDenied"), errors.AccessDenied, 1),
        ((400, "MalformedPolicyDocument"), errors.UpstreamError, 1),
        ((400, "PackedPolicyTooLarge"), errors.AccessDenied, 1),
        ((400, "ValidationError"), errors.UpstreamError, 1),
        ((403, "RegionDisabledException"), errors.UpstreamError, 1),
        ((400, "Throttling"), errors.UpstreamThrottled, 3),
        ((400, "ThrottlingException"), errors.UpstreamThrottled, 3),
        ((400, "RequestLimitExceeded"), errors.UpstreamThrottled, 3),
        ((400, "IDPCommunicationError"), errors.UpstreamError, 3),
        ((500, "InternalFailure"), errors.UpstreamError, 1),
        ((400, "SomethingNew"), errors.UpstreamError, 1),
    ],
    ids=lambda value: value[1] if isinstance(value, tuple) else None,
)
def test_maps_sts_error_codes(
    fake: FakeSTS,
    sts: BotocoreSTS,
    answer: tuple[int, str],
    expected: type[errors.BrokerError],
    attempts: int,
) -> None:
    status, code = answer
    # The message quotes the token to prove it never reaches a broker error message.
    fake.reset(*[Answer(status, error_document(code, f"bad: {TOKEN}"))] * 5)

    with pytest.raises(expected) as caught:
        sts.assume_role_with_web_identity(assume())

    assert type(caught.value) is expected
    assert TOKEN not in caught.value.message
    assert len(fake.requests) == attempts


def test_refused_requests_name_the_role_and_the_reason(fake: FakeSTS, sts: BotocoreSTS) -> None:
    fake.reset(Answer(400, error_document("MalformedPolicyDocument", "syntax error at 1:2")))

    with pytest.raises(errors.UpstreamError) as caught:
        sts.assume_role_with_web_identity(assume(policy="{}"))

    assert caught.value.message == (
        f"STS refused the request for role {ROLE} (MalformedPolicyDocument): syntax error at 1:2"
    )


def test_idp_communication_error_is_retried_then_succeeds(fake: FakeSTS, sts: BotocoreSTS) -> None:
    flaky = Answer(400, error_document("IDPCommunicationError", "IdP timed out"))
    fake.reset(flaky, flaky)

    issued = sts.assume_role_with_web_identity(assume())

    assert issued.access_key_id == "ASIAEXAMPLE"
    assert len(fake.requests) == 3


def test_retries_stop_at_max_attempts(fake: FakeSTS) -> None:
    fake.reset(*[Answer(400, error_document("IDPCommunicationError", "down"))] * 5)
    client = BotocoreSTS(settings(fake.url, max_attempts=1), retry_base_seconds=0.001)
    try:
        with pytest.raises(errors.UpstreamError):
            client.assume_role_with_web_identity(assume())
    finally:
        client.close()
    assert len(fake.requests) == 1


def test_throttling_is_retried_then_succeeds(fake: FakeSTS, sts: BotocoreSTS) -> None:
    fake.reset(Answer(400, error_document("Throttling", "Rate exceeded")))

    assert sts.assume_role_with_web_identity(assume()).access_key_id == "ASIAEXAMPLE"
    assert len(fake.requests) == 2


@pytest.mark.parametrize(
    ("headers", "retry_after"),
    [({}, 2), ({"Retry-After": "7"}, 7), ({"Retry-After": "soon"}, 2)],
)
def test_throttling_tells_the_caller_when_to_retry(
    fake: FakeSTS, sts: BotocoreSTS, headers: dict[str, str], retry_after: int
) -> None:
    fake.reset(*[Answer(400, error_document("Throttling", "Rate exceeded"), headers)] * 3)

    with pytest.raises(errors.UpstreamThrottled) as caught:
        sts.assume_role_with_web_identity(assume())

    assert caught.value.retry_after == retry_after


def test_unparseable_5xx_is_an_upstream_error_and_botocore_does_not_retry(
    fake: FakeSTS, sts: BotocoreSTS
) -> None:
    fake.reset(*[Answer(503, "<html>Service Unavailable</html>")] * 5)

    with pytest.raises(errors.UpstreamError):
        sts.assume_role_with_web_identity(assume())

    assert len(fake.requests) == 1


# --------------------------------------------------------------------------- limits


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"duration_seconds": 899}, errors.BadRequest),
        ({"duration_seconds": 43201}, errors.BadRequest),
        ({"session_name": "a"}, errors.ServerError),
        ({"session_name": "a" * 65}, errors.ServerError),
        ({"session_name": "has space"}, errors.ServerError),
        ({"session_name": "naïve"}, errors.ServerError),
        ({"session_name": "semi;colon"}, errors.ServerError),
        ({"policy": "x" * 2049}, errors.ServerError),
        # Bounds of STS's API model, checked by botocore before sending.
        ({"web_identity_token": "abc"}, errors.InvalidToken),
        ({"role_arn": "arn:aws:iam::1:r"}, errors.ServerError),
        (
            {"policy_arns": tuple(f"arn:aws:iam::aws:policy/P{i}" for i in range(11))},
            errors.ServerError,
        ),
    ],
)
def test_sts_limits_are_refused_before_any_call(
    fake: FakeSTS, sts: BotocoreSTS, overrides: dict[str, Any], expected: type[Exception]
) -> None:
    with pytest.raises(expected):
        sts.assume_role_with_web_identity(assume(**overrides))

    assert fake.requests == []


@pytest.mark.parametrize(
    "overrides",
    [
        {"duration_seconds": 900},
        {"duration_seconds": 43200},
        {"session_name": "ab"},
        {"session_name": "A-z_0+9=,.@" + "x" * 53},
        {"policy": "x" * 2048},
        {"policy_arns": tuple(f"arn:aws:iam::aws:policy/P{i}" for i in range(10))},
    ],
)
def test_values_at_the_limits_are_sent(
    fake: FakeSTS, sts: BotocoreSTS, overrides: dict[str, Any]
) -> None:
    sts.assume_role_with_web_identity(assume(**overrides))

    assert len(fake.requests) == 1


# --------------------------------------------------------------------------- transport


def test_connection_refused_is_dependency_unavailable() -> None:
    client = BotocoreSTS(settings(f"http://127.0.0.1:{free_port()}"))
    try:
        with pytest.raises(errors.DependencyUnavailable):
            client.assume_role_with_web_identity(assume())
    finally:
        client.close()


def test_read_timeout_is_dependency_unavailable(fake: FakeSTS) -> None:
    fake.reset(Answer(200, SUCCESS, delay=1.0))
    client = BotocoreSTS(settings(fake.url, timeout=0.2))
    try:
        started = time.monotonic()
        with pytest.raises(errors.DependencyUnavailable):
            client.assume_role_with_web_identity(assume())
        assert time.monotonic() - started < 0.9
    finally:
        client.close()
    assert len(fake.requests) == 1


# --------------------------------------------------------------------------- metrics


def _sts_sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize(
    ("code", "label"),
    [
        ("AccessDenied", "AccessDenied"),
        ("InvalidIdentityToken", "InvalidIdentityToken"),
        ("ThrottlingException", "ThrottlingException"),
        # An STS stand-in (or a future STS) may send any code: never a new series.
        ("SomethingNew", "other"),
        ("alice@example.com", "other"),
    ],
)
def test_sts_errors_are_counted_by_bounded_code(fake: FakeSTS, code: str, label: str) -> None:
    client = BotocoreSTS(settings(fake.url, max_attempts=1))
    fake.reset(Answer(400, error_document(code, "no")))
    errors_before = _sts_sample("broker_sts_errors_total", code=label)
    calls_before = _sts_sample("broker_sts_request_duration_seconds_count")
    try:
        with pytest.raises(errors.BrokerError):
            client.assume_role_with_web_identity(assume())
    finally:
        client.close()

    assert _sts_sample("broker_sts_errors_total", code=label) == errors_before + 1
    assert _sts_sample("broker_sts_request_duration_seconds_count") == calls_before + 1


def test_sts_latency_counts_every_attempt_and_unreachable_is_labelled() -> None:
    client = BotocoreSTS(settings(f"http://127.0.0.1:{free_port()}"))
    before = _sts_sample("broker_sts_errors_total", code="unreachable")
    try:
        with pytest.raises(errors.DependencyUnavailable):
            client.assume_role_with_web_identity(assume())
    finally:
        client.close()
    assert _sts_sample("broker_sts_errors_total", code="unreachable") == before + 1


def test_a_successful_call_is_timed_and_counts_no_error(fake: FakeSTS, sts: BotocoreSTS) -> None:
    calls = _sts_sample("broker_sts_request_duration_seconds_count")
    total_errors = sum(
        s.value
        for m in metrics.REGISTRY.collect()
        if m.name == "broker_sts_errors"
        for s in m.samples
        if s.name == "broker_sts_errors_total"
    )
    sts.assume_role_with_web_identity(assume())
    assert _sts_sample("broker_sts_request_duration_seconds_count") == calls + 1
    assert (
        sum(
            s.value
            for m in metrics.REGISTRY.collect()
            if m.name == "broker_sts_errors"
            for s in m.samples
            if s.name == "broker_sts_errors_total"
        )
        == total_errors
    )
