"""``POST /v1/credentials`` end to end: a live broker on a real socket, the real
redis-server, moto (IAM auth on) as STS and S3, and the local OIDC provider signing real
ID tokens for the demo users.

Every broker here runs with a counting proxy in front of the real ``BotocoreSTS``, so a
test can say exactly how many STS calls a request made and what they carried.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import threading
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import boto3
import pytest
import requests
from botocore.config import Config
from botocore.exceptions import ClientError
from werkzeug.serving import BaseWSGIServer, make_server

from broker.app import create_app
from broker.devstack.processes import free_port
from broker.devstack.stack import (
    ACCOUNT_ID,
    ADMIN_ROLE,
    DEMO_BUCKET,
    DEV_PROVIDER,
    OTHER_BUCKET,
    USER_ROLE,
    Stack,
)
from broker.services import Services
from broker.sts import BotocoreSTS
from tests.conftest import LiveBroker, make_settings
from tests.integration.test_credentials import CountingSTS

pytestmark = pytest.mark.integration

CREDENTIALS = "/v1/credentials"
RESPONSE_KEYS = {
    "identity_id",
    "provider",
    "role_arn",
    "assumed_role_arn",
    "expiration",
    "credentials",
}
CREDENTIAL_PROCESS_KEYS = [
    "Version",
    "AccessKeyId",
    "SecretAccessKey",
    "SessionToken",
    "Expiration",
]
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
IDENTITY_ID = re.compile(
    r"us-east-1:[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
)
UNKNOWN_ROLE = f"arn:aws:iam::{ACCOUNT_ID}:role/NotInAnyRule"
# The example-users rule's policy (dev_config); carol and bob must get exactly this.
USER_POLICY_TEMPLATE: Mapping[str, Any] = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": ["s3:GetObject", "s3:PutObject"],
            "Resource": f"arn:aws:s3:::{DEMO_BUCKET}/users/${{identity_id}}/*",
        },
        {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{DEMO_BUCKET}"},
    ],
}
PLACEHOLDER = re.compile(r"\$\{([^{}]*)\}")
# One attempt per call: a refused signature must surface, not be retried into a pass.
NO_RETRIES = Config(retries={"total_max_attempts": 1, "mode": "standard"})


# --------------------------------------------------------------------------- brokers


@dataclass
class Counted:
    """A live broker whose every STS call goes through ``sts``."""

    live: LiveBroker
    sts: CountingSTS

    @property
    def url(self) -> str:
        return self.live.url

    def ask(self, subject: str, **fields: Any) -> requests.Response:
        """Sign ``subject`` in at the OIDC provider and ask for credentials."""
        body = {"provider": DEV_PROVIDER, "token": self.live.id_token(subject), **fields}
        return self.live.post(CREDENTIALS, body)


@contextmanager
def running(
    stack: Stack, real_sts: BotocoreSTS, *, delay: float = 0.0, **overrides: Any
) -> Iterator[Counted]:
    """A broker on a free port with the dev config (plus ``overrides``) and counted STS."""
    port = free_port()
    settings = make_settings(stack, f"http://127.0.0.1:{port}", **overrides)
    sts = CountingSTS(real_sts, delay=delay)
    services = Services.build(settings, sts=sts)
    server: BaseWSGIServer = make_server(
        "127.0.0.1", port, create_app(services=services), threaded=True
    )
    # A short poll interval: shutdown() waits up to one interval, once per broker.
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        live = LiveBroker(
            url=f"http://127.0.0.1:{port}", settings=settings, services=services, stack=stack
        )
        yield Counted(live=live, sts=sts)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        services.close()


@pytest.fixture(scope="module")
def real_sts(stack: Stack) -> Iterator[BotocoreSTS]:
    # One botocore client for the module (thread-safe); every broker wraps it in its own
    # counter. The STS settings are the same for every broker built from the stack.
    settings = make_settings(stack, "http://127.0.0.1:1")
    client = BotocoreSTS(settings.sts)
    yield client
    client.close()


@pytest.fixture
def counted(stack: Stack, real_sts: BotocoreSTS) -> Iterator[Counted]:
    """A fresh broker (own Redis key prefix, so an empty cache) per test."""
    with running(stack, real_sts) as broker:
        yield broker


@pytest.fixture(scope="module")
def shared(stack: Stack, real_sts: BotocoreSTS) -> Iterator[Counted]:
    """One broker for the stateless request-shape tests."""
    with running(stack, real_sts) as broker:
        yield broker


# --------------------------------------------------------------------------- helpers


def assert_error(response: requests.Response, status: int, code: str) -> str:
    """The broker's one error shape; returns the message."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert isinstance(body, dict)
    # A rule refusal may add what the caller can act on (broker.errors details).
    assert set(body) - {"reasons", "allowed_roles"} == {"error", "message", "request_id"}
    assert body["error"] == code, body
    assert body["request_id"] == response.headers["X-Request-Id"]
    message = body["message"]
    assert isinstance(message, str)
    assert message
    lowered = response.text.lower()
    assert "<html" not in lowered
    assert "<!doctype" not in lowered
    assert "traceback" not in lowered
    assert response.headers.get("Cache-Control") == "no-store"
    return message


def s3(moto_url: str, process: Mapping[str, Any], service: str = "s3") -> Any:
    return boto3.client(
        service,
        endpoint_url=moto_url,
        region_name="us-east-1",
        aws_access_key_id=process["AccessKeyId"],
        aws_secret_access_key=process["SecretAccessKey"],
        aws_session_token=process["SessionToken"],
        config=NO_RETRIES,
    )


def refused_code(call: Any) -> str:
    with pytest.raises(ClientError) as caught:
        call()
    return str(caught.value.response.get("Error", {}).get("Code"))


def seconds_left(expiration: str) -> float:
    expires = datetime.strptime(expiration, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return (expires - datetime.now(UTC)).total_seconds()


def fill(node: Any, values: Mapping[str, str]) -> Any:
    """The policy a template must become: each placeholder replaced inside its own JSON
    string, nothing else touched (the oracle for the injection tests)."""
    if isinstance(node, Mapping):
        return {key: fill(value, values) for key, value in node.items()}
    if isinstance(node, list):
        return [fill(value, values) for value in node]
    if isinstance(node, str):
        return PLACEHOLDER.sub(lambda m: values[m.group(1)], node)
    return node


def sent_policy(sts: CountingSTS) -> Any:
    [request] = sts.requests
    assert request.policy is not None
    return json.loads(request.policy)


# --------------------------------------------------------------------------- success


def test_alice_gets_credential_process_credentials_that_work_on_aws(counted: Counted) -> None:
    response = counted.ask("alice")

    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/json"
    # The body holds live secrets: nothing on the way may keep a copy.
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json()
    assert set(body) == RESPONSE_KEYS
    assert body["provider"] == DEV_PROVIDER
    assert body["role_arn"] == ADMIN_ROLE  # the admin rule's first role is the default
    assert IDENTITY_ID.fullmatch(body["identity_id"])
    assert body["assumed_role_arn"] == (
        f"arn:aws:sts::{ACCOUNT_ID}:assumed-role/BrokerDemoAdmin/alice@example.com"
    )

    process = body["credentials"]
    assert set(process) == set(CREDENTIAL_PROCESS_KEYS)
    assert process["Version"] == 1
    assert type(process["Version"]) is int
    for key in CREDENTIAL_PROCESS_KEYS[1:]:
        assert isinstance(process[key], str)
        assert process[key]
    assert process["Expiration"] == body["expiration"]
    assert ISO_UTC.fullmatch(body["expiration"])
    assert 3600 - 60 < seconds_left(body["expiration"]) <= 3600 + 5  # the rule's default
    assert counted.sts.calls == 1

    # moto checks signatures and the role's policy: these are real credentials.
    moto = counted.live.stack.moto.url
    assert s3(moto, process, "sts").get_caller_identity()["Arn"] == body["assumed_role_arn"]
    listed = s3(moto, process).list_objects_v2(Bucket=DEMO_BUCKET)
    assert listed["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert listed["Name"] == DEMO_BUCKET

    forged_secret = {**process, "SecretAccessKey": "A" * len(process["SecretAccessKey"])}
    assert refused_code(lambda: s3(moto, forged_secret).list_objects_v2(Bucket=DEMO_BUCKET)) == (
        "SignatureDoesNotMatch"
    )
    unknown_key = {**process, "AccessKeyId": "ASIA" + "Z" * 16}
    assert refused_code(lambda: s3(moto, unknown_key).list_objects_v2(Bucket=DEMO_BUCKET)) in {
        "InvalidAccessKeyId",
        "InvalidClientTokenId",
    }


@pytest.mark.parametrize(
    ("role_arn", "role_name", "other_bucket_allowed"),
    [
        pytest.param(ADMIN_ROLE, "BrokerDemoAdmin", True, id="admin"),
        pytest.param(USER_ROLE, "BrokerDemoUser", False, id="user"),
    ],
)
def test_alice_chooses_either_of_her_roles(
    counted: Counted, role_arn: str, role_name: str, other_bucket_allowed: bool
) -> None:
    response = counted.ask("alice", role_arn=role_arn)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["role_arn"] == role_arn
    assert f":assumed-role/{role_name}/" in body["assumed_role_arn"]
    [sent] = counted.sts.requests
    assert sent.role_arn == role_arn
    # The admin rule carries no session policy.
    assert sent.policy is None

    # The chosen role's own policy (applied by moto) is what the credentials can do.
    client = s3(counted.live.stack.moto.url, body["credentials"])
    assert client.list_objects_v2(Bucket=DEMO_BUCKET)["Name"] == DEMO_BUCKET
    if other_bucket_allowed:
        assert client.list_objects_v2(Bucket=OTHER_BUCKET)["Name"] == OTHER_BUCKET
    else:
        assert refused_code(lambda: client.list_objects_v2(Bucket=OTHER_BUCKET)) == "AccessDenied"


@pytest.mark.parametrize(
    "subject",
    [
        pytest.param("bob", id="bob-no-admin-group"),
        # carol is in "admins" but signed in without MFA: the admin rule does not match,
        # so the next rule (example-users) decides.
        pytest.param("carol", id="carol-admin-without-mfa"),
    ],
)
def test_users_without_the_admin_rule_get_the_scoped_user_role(
    counted: Counted, subject: str
) -> None:
    response = counted.ask(subject)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["role_arn"] == USER_ROLE
    assert body["assumed_role_arn"].endswith(f"/BrokerDemoUser/{subject}@example.com")
    [sent] = counted.sts.requests
    assert sent.role_arn == USER_ROLE
    # The example-users rule's session policy, filled for this identity.
    assert sent_policy(counted.sts) == fill(
        USER_POLICY_TEMPLATE, {"identity_id": body["identity_id"]}
    )
    # ...and its maximum: a default of 3600 s.
    assert sent.duration_seconds == 3600


# --------------------------------------------------------------------------- rule refusals


@pytest.mark.parametrize(
    ("subject", "role_arn", "code"),
    [
        pytest.param("alice", UNKNOWN_ROLE, "role_not_allowed", id="alice-unknown-role"),
        pytest.param("bob", ADMIN_ROLE, "role_not_allowed", id="bob-admin-role"),
        pytest.param("carol", ADMIN_ROLE, "role_not_allowed", id="carol-admin-without-mfa"),
        pytest.param("mallory", None, "no_matching_rule", id="mallory-unverified-email"),
        pytest.param("mallory", USER_ROLE, "no_matching_rule", id="mallory-asks-a-role"),
        # Unknown at the provider: logs in with email = sub and no email_verified.
        pytest.param(f"stranger-{uuid.uuid4().hex[:8]}", None, "no_matching_rule", id="stranger"),
    ],
)
def test_rules_refuse_with_a_403_and_no_sts_call(
    shared: Counted, subject: str, role_arn: str | None, code: str
) -> None:
    before = shared.sts.calls
    fields = {} if role_arn is None else {"role_arn": role_arn}

    message = assert_error(shared.ask(subject, **fields), 403, code)

    assert shared.sts.calls == before
    # The caller learns why (server.explain_denials is on by default; test_explain holds
    # the wording and the private mode), but never the claim values the token carried.
    assert f"{subject}@" not in message
    assert "pwd" not in message


# --------------------------------------------------------------------------- identity ids


def test_identity_ids_are_stable_per_person_and_distinct_between_people(
    counted: Counted, stack: Stack, real_sts: BotocoreSTS
) -> None:
    first_token = counted.live.id_token("alice")
    second_token = counted.live.id_token("alice")
    assert first_token != second_token  # two separate logins

    ids = []
    for token in (first_token, second_token):
        response = counted.live.post(CREDENTIALS, {"provider": DEV_PROVIDER, "token": token})
        assert response.status_code == 200, response.text
        ids.append(response.json()["identity_id"])
    bob = counted.ask("bob").json()["identity_id"]

    assert ids[0] == ids[1]
    assert bob != ids[0]
    assert IDENTITY_ID.fullmatch(bob)
    # Another node (own process state, own Redis prefix) derives the same id: no table.
    with running(stack, real_sts) as other_node:
        assert other_node.ask("alice").json()["identity_id"] == ids[0]


# --------------------------------------------------------------------------- duration


@pytest.mark.parametrize(
    ("subject", "duration", "highest"),
    [
        pytest.param("alice", 899, 43200, id="below-sts-minimum"),
        pytest.param("alice", 43201, 43200, id="above-sts-maximum"),
        pytest.param("alice", 0, 43200, id="zero"),
        pytest.param("alice", -3600, 43200, id="negative"),
        pytest.param("bob", 3601, 3600, id="above-bobs-rule-maximum"),
        pytest.param("bob", 43200, 3600, id="sts-maximum-above-bobs-rule"),
    ],
)
def test_durations_outside_the_allowed_range_are_a_400(
    shared: Counted, subject: str, duration: int, highest: int
) -> None:
    before = shared.sts.calls

    message = assert_error(shared.ask(subject, duration_seconds=duration), 400, "invalid_request")

    # The message names the range this caller may ask for (the rule's maximum).
    assert "900" in message
    assert str(highest) in message
    assert shared.sts.calls == before


@pytest.mark.parametrize(
    ("subject", "duration"),
    [
        pytest.param("alice", 900, id="sts-minimum"),
        pytest.param("alice", 43200, id="alices-rule-maximum"),
        pytest.param("bob", 3600, id="bobs-rule-maximum"),
    ],
)
def test_durations_within_the_range_reach_sts(
    counted: Counted, subject: str, duration: int
) -> None:
    response = counted.ask(subject, duration_seconds=duration)

    assert response.status_code == 200, response.text
    [sent] = counted.sts.requests
    assert sent.duration_seconds == duration
    assert duration - 60 < seconds_left(response.json()["expiration"]) <= duration + 5


# --------------------------------------------------------------------------- request errors

MARKER = "TOKENMARKER7f3a"  # in every token a test sends, to prove none is echoed
VALID = {"provider": DEV_PROVIDER, "token": f"x.{MARKER}.y"}


@dataclass(frozen=True)
class Bad:
    status: int
    code: str
    body: bytes | None = None
    content_type: str = "application/json"
    method: str = "POST"
    path: str = CREDENTIALS


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


BAD_REQUESTS = {
    "malformed-json": Bad(400, "invalid_request", b'{"provider": "demo", "token": '),
    "json-array": Bad(400, "invalid_request", _json([VALID])),
    "json-string": Bad(400, "invalid_request", _json(VALID["token"])),
    "json-null": Bad(400, "invalid_request", b"null"),
    "empty-body": Bad(400, "invalid_request", b""),
    "not-json-content-type": Bad(400, "invalid_request", _json(VALID), "text/plain"),
    "form-encoded": Bad(
        400,
        "invalid_request",
        f"provider=demo&token={MARKER}".encode(),
        "application/x-www-form-urlencoded",
    ),
    "missing-token": Bad(400, "invalid_request", _json({"provider": DEV_PROVIDER})),
    "empty-token": Bad(400, "invalid_request", _json({**VALID, "token": ""})),
    "null-token": Bad(400, "invalid_request", _json({**VALID, "token": None})),
    "missing-provider": Bad(400, "invalid_request", _json({"token": VALID["token"]})),
    "unknown-field": Bad(400, "invalid_request", _json({**VALID, "roleArn": ADMIN_ROLE})),
    "unknown-provider": Bad(400, "unknown_provider", _json({**VALID, "provider": "nope"})),
    "token-int": Bad(400, "invalid_request", _json({**VALID, "token": 12345})),
    "token-object": Bad(400, "invalid_request", _json({**VALID, "token": {"t": MARKER}})),
    "provider-list": Bad(400, "invalid_request", _json({**VALID, "provider": [DEV_PROVIDER]})),
    "duration-string": Bad(400, "invalid_request", _json({**VALID, "duration_seconds": "3600"})),
    "duration-float": Bad(400, "invalid_request", _json({**VALID, "duration_seconds": 3600.0})),
    "duration-bool": Bad(400, "invalid_request", _json({**VALID, "duration_seconds": True})),
    "role-arn-list": Bad(400, "invalid_request", _json({**VALID, "role_arn": [ADMIN_ROLE]})),
    "nonce-int": Bad(400, "invalid_request", _json({**VALID, "nonce": 1})),
    "token-too-long": Bad(400, "invalid_request", _json({**VALID, "token": MARKER * 1200})),
    "body-too-large": Bad(413, "request_too_large", _json({**VALID, "token": MARKER * 5000})),
    "get": Bad(405, "method_not_allowed", method="GET"),
    "put": Bad(405, "method_not_allowed", _json(VALID), method="PUT"),
    "unknown-api-path": Bad(404, "not_found", _json(VALID), path="/v1/credential"),
    "unknown-path": Bad(404, "not_found", method="GET", path="/nope"),
    "garbage-token": Bad(401, "invalid_token", _json(VALID)),
    "garbage-jwt-shape": Bad(
        401,
        "invalid_token",
        _json({**VALID, "token": f"eyJhbGciOiJSUzI1NiJ9.{MARKER}.{MARKER}"}),
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_requests_get_a_json_error_and_never_reach_sts(shared: Counted, case: Bad) -> None:
    before = shared.sts.calls
    headers = {"Content-Type": case.content_type} if case.body is not None else {}

    response = requests.request(
        case.method, f"{shared.url}{case.path}", data=case.body, headers=headers, timeout=30
    )

    message = assert_error(response, case.status, case.code)
    assert MARKER not in response.text
    assert MARKER not in message
    assert shared.sts.calls == before


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_a_405_names_the_allowed_method(shared: Counted, method: str) -> None:
    # RFC 9110 15.5.6: a 405 response MUST carry Allow with the methods the resource has.
    response = requests.request(method, f"{shared.url}{CREDENTIALS}", timeout=30)

    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers.get("Allow", "")


def test_deeply_nested_json_is_a_400(shared: Counted) -> None:
    # 3000 levels in ~18 KB: well inside the body limit, deeper than the JSON parser's
    # recursion limit. A caller's malformed body is a 400, not an internal error.
    body = b'{"a":' * 3000 + b"1" + b"}" * 3000
    assert len(body) < shared.live.settings.server.max_body_bytes

    response = requests.post(
        f"{shared.url}{CREDENTIALS}",
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )

    assert_error(response, 400, "invalid_request")


def test_an_oversized_chunked_body_is_a_413(shared: Counted) -> None:
    # No Content-Length to refuse up front: the limit must still read as "too large".
    limit = shared.live.settings.server.max_body_bytes

    def chunks() -> Iterator[bytes]:
        yield b'{"provider": "demo", "token": "'
        for _ in range(limit // 1024 + 1):
            yield b"x" * 1024
        yield b'"}'

    response = requests.post(
        f"{shared.url}{CREDENTIALS}",
        data=chunks(),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )

    assert_error(response, 413, "request_too_large")


def test_token_length_limit_is_checked_before_the_body_limit(shared: Counted) -> None:
    # Sanity for the table above: the "too long" token fits the body limit, the
    # "too large" body does not, so each row exercises the check it names.
    limit = shared.live.settings.server.max_body_bytes
    assert BAD_REQUESTS["token-too-long"].body is not None
    assert BAD_REQUESTS["body-too-large"].body is not None
    assert len(BAD_REQUESTS["token-too-long"].body) < limit
    assert len(BAD_REQUESTS["body-too-large"].body) > limit


def _tampered(token: str) -> str:
    """Alice's real token with its payload changed to say bob: the signature breaks."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(sub="bob", email="bob@example.com")
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


@pytest.mark.parametrize(
    ("signed_nonce", "sent_nonce", "tamper"),
    [
        pytest.param("nonce-A", "nonce-B", False, id="nonce-mismatch"),
        pytest.param(None, "nonce-B", False, id="nonce-sent-token-has-none"),
        pytest.param(None, None, True, id="payload-tampered"),
    ],
)
def test_token_failures_are_a_401_that_does_not_echo_the_token(
    shared: Counted, signed_nonce: str | None, sent_nonce: str | None, tamper: bool
) -> None:
    before = shared.sts.calls
    token = shared.live.id_token("alice", nonce=signed_nonce)
    if tamper:
        token = _tampered(token)
    body: dict[str, Any] = {"provider": DEV_PROVIDER, "token": token}
    if sent_nonce is not None:
        body["nonce"] = sent_nonce

    response = shared.live.post(CREDENTIALS, body)

    message = assert_error(response, 401, "invalid_token")
    for part in token.split("."):
        assert part not in response.text
    assert "nonce-A" not in message
    assert shared.sts.calls == before


def test_the_matching_nonce_is_accepted(counted: Counted) -> None:
    # The control for the nonce rows above: the same flow with the right nonce passes.
    nonce = secrets.token_urlsafe(16)
    token = counted.live.id_token("alice", nonce=nonce)

    response = counted.live.post(
        CREDENTIALS, {"provider": DEV_PROVIDER, "token": token, "nonce": nonce}
    )

    assert response.status_code == 200, response.text
    assert counted.sts.calls == 1


# --------------------------------------------------------------------------- health


def test_healthz_and_readyz(shared: Counted) -> None:
    health = requests.get(f"{shared.url}/healthz", timeout=10)
    assert health.status_code == 200
    assert health.headers["Content-Type"] == "application/json"
    assert health.json() == {"status": "ok"}

    ready = requests.get(f"{shared.url}/readyz", timeout=10)
    assert ready.status_code == 200
    assert ready.headers["Content-Type"] == "application/json"
    body = ready.json()
    assert body["status"] == "ready"
    assert body["redis"] == "ok"
    assert body["config_version"] == shared.live.settings.config_version
    # Every provider is named; none is unavailable (pending until its keys are fetched).
    assert set(body["providers"]) == set(shared.live.settings.providers)
    assert not any(v.startswith("unavailable") for v in body["providers"].values())


# --------------------------------------------------------------------------- singleflight


def test_a_burst_of_50_requests_for_one_identity_makes_one_sts_call(
    stack: Stack, real_sts: BotocoreSTS
) -> None:
    n = 50
    # The delay keeps the leader's STS call open while every other request arrives.
    with running(
        stack,
        real_sts,
        delay=0.3,
        rate_limit={"per_ip_per_minute": 10_000, "per_identity_per_minute": 10_000},
    ) as broker:
        # Several logins: different tokens for the same person share one cache entry.
        tokens = [broker.live.id_token("bob") for _ in range(3)]
        start = threading.Barrier(n)

        def one(i: int) -> requests.Response:
            start.wait(timeout=30)
            return broker.live.post(
                CREDENTIALS, {"provider": DEV_PROVIDER, "token": tokens[i % len(tokens)]}
            )

        with ThreadPoolExecutor(max_workers=n) as pool:
            responses = list(pool.map(one, range(n)))

        assert [r.status_code for r in responses] == [200] * n, [
            r.text for r in responses if r.status_code != 200
        ][:3]
        keys = {r.json()["credentials"]["AccessKeyId"] for r in responses}
        assert len(keys) == 1
        assert broker.sts.calls == 1


# --------------------------------------------------------------------------- injection

# Every identity value the templates can hold, each inside a JSON string value.
INJECTION_TEMPLATE: Mapping[str, Any] = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": ["s3:GetObject", "s3:PutObject"],
            "Resource": f"arn:aws:s3:::{DEMO_BUCKET}/users/${{email}}/*",
        },
        {
            "Effect": "Allow",
            "Action": "s3:ListBucket",
            "Resource": f"arn:aws:s3:::{DEMO_BUCKET}",
            "Condition": {"StringLike": {"s3:prefix": ["users/${sub}/*", "teams/${claim:team}/*"]}},
        },
    ],
}
INJECTION_RULES = [
    {
        "name": "scoped-by-claims",
        "providers": [DEV_PROVIDER],
        "conditions": [{"claim": "email", "op": "glob", "value": "*@example.com"}],
        "require_email_verified": True,
        "roles": [USER_ROLE],
        "session_policy": INJECTION_TEMPLATE,
    }
]
BREAKOUT = '"}],"Statement":[{"Sid":"pwned","Effect":"Allow","Action":"*","Resource":"*"}]'


def _provider_user(stack: Stack, sub: str, claims: Mapping[str, Any]) -> None:
    """Create a fresh user at the OIDC provider (never one of the shared demo users)."""
    response = requests.put(
        f"{stack.oidc.url}/users/{quote(sub, safe='')}", json=dict(claims), timeout=10
    )
    assert response.status_code == 204, response.text


@pytest.mark.parametrize(
    ("placeholder", "payload"),
    [
        pytest.param(None, None, id="control-plain-values"),
        pytest.param("email", f"x{BREAKOUT}//@example.com", id="email-breaks-out-of-string"),
        pytest.param("sub", f'x{BREAKOUT},"x":"', id="sub-breaks-out-of-string"),
        pytest.param("claim:team", 'ops","Action":"*', id="claim-adds-action"),
        pytest.param("email", "*@example.com", id="email-wildcard"),
        pytest.param("email", "${aws:username}@example.com", id="email-iam-variable"),
        pytest.param("claim:team", "ops/../../*", id="claim-path-traversal"),
    ],
)
def test_claim_values_cannot_change_the_session_policy_structure(
    stack: Stack, real_sts: BotocoreSTS, placeholder: str | None, payload: str | None
) -> None:
    fresh = f"inj-{uuid.uuid4().hex[:12]}"
    values = {"sub": fresh, "email": f"{fresh}@example.com", "claim:team": "ops"}
    if placeholder is not None and payload is not None:
        values[placeholder] = payload if placeholder != "sub" else fresh + payload
    _provider_user(
        stack,
        values["sub"],
        {"email": values["email"], "email_verified": True, "team": values["claim:team"]},
    )

    with running(stack, real_sts, rules=INJECTION_RULES) as broker:
        response = broker.ask(values["sub"])

        if placeholder is None:
            assert response.status_code == 200, response.text
        if response.status_code == 200:
            # Issued: the STS policy is the template with each value as one JSON string.
            assert response.json()["role_arn"] == USER_ROLE
            policy = sent_policy(broker.sts)
            assert policy == fill(INJECTION_TEMPLATE, values)
            assert len(policy["Statement"]) == 2
        else:
            # Refused: the rule matched (not no_matching_rule) but the value cannot be put
            # in a policy safely; nothing reached STS and the value is not echoed.
            message = assert_error(response, 403, "access_denied")
            assert broker.sts.calls == 0
            assert payload is not None
            assert payload not in message
            assert "pwned" not in response.text
