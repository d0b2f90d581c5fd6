"""Login with Amazon and Facebook end to end, over real sockets everywhere.

A live broker (``create_app`` served by werkzeug) verifies tokens against the local
Login with Amazon and Graph API stand-ins, keeps state in a real redis-server and mints
credentials from moto's STS (IAM authentication on). moto's request recorder shows what
reached STS (``ProviderId`` ``www.amazon.com`` / ``graph.facebook.com``, or none for a
Limited Login ID token), and the minted credentials are used for signed S3 and STS
calls that moto checks against the role's policy.
"""

from __future__ import annotations

import base64
import os
import secrets
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import boto3
import pytest
import requests
from botocore.config import Config
from botocore.exceptions import ClientError
from werkzeug.serving import BaseWSGIServer, make_server

from broker.app import create_app
from broker.devstack.processes import ManagedProcess, free_port
from broker.devstack.redis_server import start_redis
from broker.devstack.social_servers import (
    AMAZON_DEMO_USERS,
    DEMO_FACEBOOK_APP_ID,
    FACEBOOK_DEMO_USERS,
    DemoUser,
    SocialServers,
    start_social_servers,
)
from broker.services import Services
from broker.settings import Settings, settings_from_mapping
from tests.integration.aws_fixtures import (
    ALLOWED_BUCKET,
    OTHER_BUCKET,
    READER_ROLE,
    REGION,
    WRITER_ROLE,
    LocalAWS,
    local_aws,
)

pytestmark = pytest.mark.integration

PROVIDER_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def aws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalAWS]:
    with local_aws(tmp_path_factory.mktemp("moto")) as running:
        yield running


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    proc = start_redis(tmp_path_factory.mktemp("redis"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def social_stand_ins() -> Iterator[SocialServers]:
    with start_social_servers() as servers:
        servers.amazon.hang_seconds = servers.facebook.hang_seconds = 10 * PROVIDER_TIMEOUT
        yield servers


@pytest.fixture
def social(social_stand_ins: SocialServers) -> SocialServers:
    social_stand_ins.reset()
    return social_stand_ins


def _key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def broker_config(
    *, url: str, redis_port: int, aws: LocalAWS, social: SocialServers
) -> dict[str, Any]:
    return {
        "server": {"public_url": url},
        "redis": {
            "url": f"redis://127.0.0.1:{redis_port}/0",
            "key_prefix": f"social-e2e:{uuid.uuid4().hex[:8]}:",
        },
        "security": {"identity_key": _key(), "encryption_keys": [_key()]},
        "sts": {"region": REGION, "endpoint_url": aws.url},
        "web": {"cookie_secure": False},
        "providers": social.provider_config(
            limited_login=True, limited_login_sts_ready=True, timeout_seconds=PROVIDER_TIMEOUT
        ),
        "rules": [
            {
                "name": "amazon-example-users",
                "providers": ["amazon"],
                "conditions": [{"claim": "email", "op": "glob", "value": "*@example.com"}],
                "roles": [WRITER_ROLE],
                "max_duration_seconds": 3600,
            },
            {
                "name": "facebook-app-users",
                "providers": ["facebook"],
                "conditions": [
                    {"claim": "app_id", "op": "equals", "value": DEMO_FACEBOOK_APP_ID},
                    {"claim": "email", "op": "glob", "value": "*@example.com"},
                ],
                "roles": [READER_ROLE],
                "max_duration_seconds": 3600,
            },
        ],
    }


@dataclass
class LiveBroker:
    url: str
    settings: Settings

    def credentials(self, provider: str, token: str, **extra: Any) -> requests.Response:
        return requests.post(
            f"{self.url}/v1/credentials",
            json={"provider": provider, "token": token, **extra},
            timeout=30,
        )


@pytest.fixture(scope="module")
def broker(
    aws: LocalAWS, redis_server: ManagedProcess, social_stand_ins: SocialServers
) -> Iterator[LiveBroker]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = settings_from_mapping(
        broker_config(url=url, redis_port=redis_server.port, aws=aws, social=social_stand_ins),
        env={},
        base_dir=Path.cwd(),
        source="social e2e",
    )
    services = Services.build(settings)
    server: BaseWSGIServer = make_server(
        "127.0.0.1", port, create_app(services=services), threaded=True
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield LiveBroker(url=url, settings=settings)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        services.close()


def aws_client(aws: LocalAWS, service: str, issued: dict[str, Any]) -> Any:
    """A boto3 client signing with the credentials the broker returned."""
    creds = issued["credentials"]
    return boto3.client(
        service,
        endpoint_url=aws.url,
        region_name=REGION,
        aws_access_key_id=creds["AccessKeyId"],
        aws_secret_access_key=creds["SecretAccessKey"],
        aws_session_token=creds["SessionToken"],
        config=Config(retries={"total_max_attempts": 1, "mode": "standard"}),
    )


def denied(call: Callable[[], Any]) -> str:
    with pytest.raises(ClientError) as exc:
        call()
    return str(exc.value.response.get("Error", {}).get("Code"))


# --------------------------------------------------------------------------- success


def test_login_with_amazon_token_mints_credentials_via_www_amazon_com(
    broker: LiveBroker, social: SocialServers, aws: LocalAWS
) -> None:
    token = social.amazon.mint("alice")
    with aws.recording() as recording:
        response = broker.credentials("amazon", token)
    assert response.status_code == 200, response.text
    issued = response.json()
    assert issued["provider"] == "amazon"
    assert issued["role_arn"] == WRITER_ROLE
    assert token not in response.text

    (call,) = recording.sts_calls()
    assert call["ProviderId"] == "www.amazon.com"
    assert call["WebIdentityToken"] == token
    assert call["RoleArn"] == WRITER_ROLE

    # The credentials are real: moto checks the signature and the role's policy.
    sts = aws_client(aws, "sts", issued)
    assert sts.get_caller_identity()["Arn"].startswith(
        "arn:aws:sts::123456789012:assumed-role/BrokerTestWriter/"
    )
    s3 = aws_client(aws, "s3", issued)
    s3.put_object(Bucket=ALLOWED_BUCKET, Key="from-amazon.txt", Body=b"hi")
    assert s3.get_object(Bucket=ALLOWED_BUCKET, Key="from-amazon.txt")["Body"].read() == b"hi"
    assert denied(lambda: s3.list_objects_v2(Bucket=OTHER_BUCKET)) == "AccessDenied"


def test_facebook_token_mints_credentials_via_graph_facebook_com(
    broker: LiveBroker, social: SocialServers, aws: LocalAWS
) -> None:
    token = social.facebook.mint("bob")
    with aws.recording() as recording:
        response = broker.credentials("facebook", token)
    assert response.status_code == 200, response.text
    issued = response.json()
    assert issued["role_arn"] == READER_ROLE

    (call,) = recording.sts_calls()
    assert call["ProviderId"] == "graph.facebook.com"
    assert call["WebIdentityToken"] == token

    s3 = aws_client(aws, "s3", issued)
    assert s3.list_objects_v2(Bucket=ALLOWED_BUCKET)["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert denied(lambda: s3.put_object(Bucket=ALLOWED_BUCKET, Key="x", Body=b"x")) == (
        "AccessDenied"
    )
    # The stand-in checked appsecret_proof on /me: the request would have failed otherwise.
    assert social.facebook.hits("/me") == 1


def test_facebook_limited_login_id_token_goes_to_sts_without_provider_id(
    broker: LiveBroker, social: SocialServers, aws: LocalAWS
) -> None:
    nonce = secrets.token_urlsafe(16)
    token = social.facebook.mint_limited_login("alice", nonce=nonce)
    with aws.recording() as recording:
        response = broker.credentials("facebook", token, nonce=nonce)
    assert response.status_code == 200, response.text
    (call,) = recording.sts_calls()
    assert "ProviderId" not in call  # an OIDC ID token, for an IAM OIDC provider
    assert call["WebIdentityToken"] == token
    assert social.facebook.hits("/debug_token") == 0  # no Graph round trip for a JWT


def test_one_token_costs_one_upstream_verification(
    broker: LiveBroker, social: SocialServers, aws: LocalAWS
) -> None:
    token = social.amazon.mint("bob")
    with aws.recording() as recording:
        first = broker.credentials("amazon", token)
        second = broker.credentials("amazon", token)
    assert first.status_code == second.status_code == 200
    assert social.amazon.hits("/auth/o2/tokeninfo") == 1
    assert social.amazon.hits("/user/profile") == 1
    # ...and one STS call: the credentials are cached for this identity and grant.
    assert len(recording.sts_calls()) == 1
    assert first.json()["credentials"] == second.json()["credentials"]


def test_same_person_same_identity_id_across_requests(
    broker: LiveBroker, social: SocialServers
) -> None:
    ids = {
        broker.credentials("facebook", social.facebook.mint("alice")).json()["identity_id"]
        for _ in range(2)
    }
    assert len(ids) == 1


# --------------------------------------------------------------------------- refusals


def _revoked(social: SocialServers) -> str:
    token = social.facebook.mint("alice")
    social.facebook.revoke(token)
    return token


@dataclass(frozen=True)
class Refusal:
    provider: str
    token: Callable[[SocialServers], str]
    status: int
    code: str
    fault: Callable[[SocialServers], None] | None = None
    nonce: str | None = None


REFUSALS = [
    pytest.param(
        Refusal(
            "amazon", lambda s: s.amazon.mint("alice", client_id="other"), 401, "invalid_token"
        ),
        id="amazon-token-for-another-app",
    ),
    pytest.param(
        Refusal("amazon", lambda _: "Atza|forged", 401, "invalid_token"), id="amazon-forged"
    ),
    pytest.param(
        Refusal("amazon", lambda s: s.amazon.mint("alice", expires_in=-5), 401, "invalid_token"),
        id="amazon-expired",
    ),
    pytest.param(
        Refusal("amazon", lambda s: s.amazon.mint("mallory"), 403, "no_matching_rule"),
        id="amazon-no-rule-matches",
    ),
    pytest.param(
        Refusal("facebook", lambda s: s.facebook.mint("alice", app_id="42"), 401, "invalid_token"),
        id="facebook-token-for-another-app",
    ),
    pytest.param(
        Refusal(
            "facebook", lambda s: s.facebook.mint("alice", expires_in=-5), 401, "expired_token"
        ),
        id="facebook-expired",
    ),
    pytest.param(Refusal("facebook", _revoked, 401, "invalid_token"), id="facebook-revoked"),
    pytest.param(
        Refusal(
            "facebook",
            lambda s: s.facebook.mint_limited_login("alice", nonce="n"),
            401,
            "invalid_token",
        ),
        id="limited-login-without-nonce",
    ),
    pytest.param(
        Refusal(
            "amazon",
            lambda s: s.amazon.mint("alice"),
            502,
            "upstream_error",
            fault=lambda s: s.amazon.fail("error"),
        ),
        id="amazon-500",
    ),
    pytest.param(
        Refusal(
            "facebook",
            lambda s: s.facebook.mint("alice"),
            502,
            "upstream_error",
            fault=lambda s: s.facebook.fail("malformed", endpoint="/debug_token"),
        ),
        id="facebook-malformed-json",
    ),
    pytest.param(
        Refusal(
            "facebook",
            lambda s: s.facebook.mint("alice"),
            503,
            "dependency_unavailable",
            fault=lambda s: s.facebook.fail("hang", endpoint="/me"),
        ),
        id="facebook-timeout",
    ),
]


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals(case: Refusal, broker: LiveBroker, social: SocialServers, aws: LocalAWS) -> None:
    token = case.token(social)
    if case.fault is not None:
        case.fault(social)
    with aws.recording() as recording:
        response = broker.credentials(case.provider, token)
    assert response.status_code == case.status, response.text
    assert response.json()["error"] == case.code
    assert token not in response.text
    assert quote(token, safe="") not in response.text
    assert recording.sts_calls() == []  # refused before STS saw anything


def test_demo_users_match_the_rules() -> None:
    """The example rules above rely on the stand-ins' demo data."""
    assert AMAZON_DEMO_USERS[0].email == FACEBOOK_DEMO_USERS[0].email == "alice@example.com"
    assert AMAZON_DEMO_USERS[2].email is not None
    assert not AMAZON_DEMO_USERS[2].email.endswith("@example.com")


# --------------------------------------------------------------------------- browser flow


@pytest.mark.parametrize(
    ("provider", "user", "role"),
    [
        ("amazon", AMAZON_DEMO_USERS[1], WRITER_ROLE),
        ("facebook", FACEBOOK_DEMO_USERS[1], READER_ROLE),
    ],
)
def test_web_sign_in_through_the_stand_in(
    broker: LiveBroker, social: SocialServers, provider: str, user: DemoUser, role: str
) -> None:
    """GET /login/<provider> -> the stand-in's consent page -> callback -> session, with
    the code exchanged (PKCE S256) at the stand-in's token endpoint."""
    browser = requests.Session()
    start = browser.get(f"{broker.url}/login/{provider}", allow_redirects=False, timeout=10)
    assert start.status_code == 302
    authorize = start.headers["Location"]
    assert authorize.startswith(social.amazon.url if provider == "amazon" else social.facebook.url)
    assert "code_challenge=" in authorize

    page = browser.get(authorize, timeout=10)
    assert page.status_code == 200
    assert user.name in page.text  # the demo user picker
    back = browser.get(f"{authorize}&user={user.key}", allow_redirects=False, timeout=10)
    assert back.status_code == 302
    assert back.headers["Location"].startswith(f"{broker.url}/callback/{provider}?")

    signed_in = browser.get(back.headers["Location"], allow_redirects=False, timeout=10)
    assert signed_in.status_code == 303, signed_in.text
    session = browser.get(f"{broker.url}/v1/session", timeout=10).json()
    assert session["provider"] == provider
    assert session["subject"] == user.user_id
    assert session["roles"] == [role]

    issued = browser.post(
        f"{broker.url}/v1/session/credentials",
        json={},
        headers={"X-CSRF-Token": session["csrf_token"]},
        timeout=30,
    )
    assert issued.status_code == 200, issued.text
    assert issued.json()["role_arn"] == role
