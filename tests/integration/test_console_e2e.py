"""Console sign-in end to end: a live broker on a real socket, the real local stack (Redis,
moto with IAM auth on, the OIDC provider) and the local federation endpoint, which
accepts only credentials moto really issued (it calls GetCallerIdentity with them).

The browser flow reaches ``GET /console`` through the console part's session seam
(``install_session_lookup``) with an identity verified from a real ID token, so it runs
whatever the state of browser sessions; the web sign-in part tests its own sessions.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from flask import Flask
from werkzeug.serving import BaseWSGIServer, make_server

from broker.app import create_app
from broker.devstack.federation_server import FederationServer, start_federation_server
from broker.devstack.processes import free_port
from broker.devstack.stack import ADMIN_ROLE, DEV_CLIENT_ID, DEV_PROVIDER, USER_ROLE, Stack
from broker.errors import AccessDenied
from broker.identity import Identity
from broker.services import Services
from broker.sts import BotocoreSTS
from broker.web.console import SessionLookup, install_session_lookup
from tests.conftest import make_settings
from tests.integration.test_credentials import CountingSTS
from tests.unit.test_console import BAD_REGIONS, HOSTILE_DESTINATIONS

pytestmark = pytest.mark.integration

GOV_ROLE = "arn:aws-us-gov:iam::123456789012:role/BrokerDemoAdmin"
CN_ROLE = "arn:aws-cn:iam::123456789012:role/BrokerDemoAdmin"


def demo_subject(name: str) -> str:
    """The demo user's ``sub`` (``alice`` or ``alice@...``), from the provider's list."""
    from broker.devstack.oidc_server import DEMO_USERS

    for user in DEMO_USERS:
        sub = str(user["sub"])
        if name in {sub, sub.partition("@")[0]}:
            return sub
    raise LookupError(f"no demo user {name!r}")


def id_token(stack: Stack, name: str, nonce: str) -> str:
    from broker.devstack.oidc_login import login

    return login(
        stack.oidc.url, subject=demo_subject(name), client_id=DEV_CLIENT_ID, nonce=nonce
    ).id_token


@dataclass
class ConsoleBroker:
    url: str
    app: Flask
    services: Services
    stack: Stack

    def api(self, name: str, **body: Any) -> requests.Response:
        nonce = secrets.token_urlsafe(16)
        token = id_token(self.stack, name, nonce)
        return requests.post(
            f"{self.url}/v1/console-url",
            json={"provider": DEV_PROVIDER, "token": token, "nonce": nonce, **body},
            timeout=30,
        )

    def sign_in_browser(self, name: str) -> Identity:
        """A browser session for ``name``: the identity is verified from a real token."""
        nonce = secrets.token_urlsafe(16)
        identity = self.services.identify(
            DEV_PROVIDER, id_token(self.stack, name, nonce), nonce=nonce
        )

        def check_csrf(submitted: str | None) -> None:
            if submitted != "csrf":
                raise AccessDenied("bad CSRF token")

        install_session_lookup(
            self.app, SessionLookup(identity=lambda: identity, check_csrf=check_csrf)
        )
        return identity


@contextmanager
def serve_console(
    stack: Stack, *, sts: CountingSTS | None = None, **overrides: Any
) -> Iterator[ConsoleBroker]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config_rules = stack.config(url)["rules"]
    # Alice's rule also allows the same role in the other two partitions (moto issues
    # credentials for any role ARN; the partition only decides the console's hosts).
    config_rules[0]["roles"] = [*config_rules[0]["roles"], GOV_ROLE, CN_ROLE]
    settings = make_settings(stack, url, rules=config_rules, **overrides)
    services = Services.build(settings, sts=sts)
    app = create_app(services=services)
    server: BaseWSGIServer = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield ConsoleBroker(url=url, app=app, services=services, stack=stack)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        services.close()


@pytest.fixture(scope="module")
def federation(stack: Stack) -> Iterator[FederationServer]:
    with start_federation_server(sts_url=stack.moto.url) as server:
        yield server


@pytest.fixture(autouse=True)
def _reset(federation: FederationServer) -> None:
    federation.state.forced_response = None


@pytest.fixture
def live(stack: Stack, federation: FederationServer) -> Iterator[ConsoleBroker]:
    with serve_console(stack, console={"federation_url": federation.url}) as broker:
        yield broker


def _login_params(url: str, federation: FederationServer) -> dict[str, str]:
    assert url.startswith(federation.url + "?")
    params = parse_qs(urlsplit(url).query, strict_parsing=True)
    assert set(params) == {"Action", "Issuer", "Destination", "SigninToken"}
    assert all(len(values) == 1 for values in params.values())
    return {name: values[0] for name, values in params.items()}


def _at(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


# --------------------------------------------------------------------------- browser


def test_browser_flow_redirects_to_the_console_as_the_allowed_role(
    live: ConsoleBroker, federation: FederationServer
) -> None:
    live.sign_in_browser("alice")
    response = requests.get(
        f"{live.url}/console",
        params={"role_arn": ADMIN_ROLE, "destination": "ec2", "region": "eu-west-1"},
        allow_redirects=False,
        timeout=30,
    )
    assert response.status_code == 302, response.text
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    params = _login_params(response.headers["Location"], federation)
    record = federation.records[-1]
    assert params == {
        "Action": "login",
        "Issuer": live.url,  # the broker's own public URL
        "Destination": "https://eu-west-1.console.aws.amazon.com/ec2/home?region=eu-west-1",
        "SigninToken": record.signin_token,
    }
    # The federation endpoint saw credentials moto issued for the requested role.
    assert ":assumed-role/BrokerDemoAdmin/" in record.caller_arn
    assert record.session_duration is None

    landing = requests.get(response.headers["Location"], timeout=30)
    assert landing.status_code == 200
    assert record.caller_arn in landing.text


def test_browser_without_a_session_is_sent_to_sign_in(live: ConsoleBroker) -> None:
    install_session_lookup(
        live.app, SessionLookup(identity=lambda: None, check_csrf=lambda _token: None)
    )
    response = requests.get(
        f"{live.url}/console?role_arn={ADMIN_ROLE}&destination=s3",
        allow_redirects=False,
        timeout=30,
    )
    assert response.status_code == 302
    location = urlsplit(response.headers["Location"])
    assert location.path == "/login"
    assert parse_qs(location.query)["next"] == [f"/console?role_arn={ADMIN_ROLE}&destination=s3"]


# --------------------------------------------------------------------------- API


def test_api_flow_reuses_the_cached_credentials(
    live: ConsoleBroker, federation: FederationServer
) -> None:
    response = live.api("alice", role_arn=ADMIN_ROLE, destination="s3", region="us-east-1")
    assert response.status_code == 200, response.text
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json()
    params = _login_params(body["url"], federation)
    assert params["Destination"] == "https://console.aws.amazon.com/s3/home?region=us-east-1"
    assert params["Issuer"] == live.url
    record = federation.records[-1]
    assert params["SigninToken"] == record.signin_token
    url_expiry = _at(body["expires_at"])
    assert 890 <= (url_expiry - datetime.now(UTC)).total_seconds() <= 905

    # Same identity, role and duration as a credentials request: the same cached
    # credentials, so the console session is the one the CLI gets.
    nonce = secrets.token_urlsafe(16)
    creds = requests.post(
        f"{live.url}/v1/credentials",
        json={
            "provider": DEV_PROVIDER,
            "token": id_token(live.stack, "alice", nonce),
            "nonce": nonce,
            "role_arn": ADMIN_ROLE,
        },
        timeout=30,
    ).json()
    assert creds["credentials"]["AccessKeyId"] == record.access_key_id
    assert body["session_source"] == "credentials"
    assert body["session_expires_at"] == creds["expiration"]

    landing = requests.get(body["url"], timeout=30)
    assert landing.status_code == 200
    assert "BrokerDemoAdmin" in landing.text


def test_api_refuses_a_role_the_rules_do_not_allow(
    live: ConsoleBroker, federation: FederationServer
) -> None:
    before = len(federation.records)
    response = live.api("bob", role_arn=ADMIN_ROLE)
    assert response.status_code == 403
    assert len(federation.records) == before


# --------------------------------------------------------------------------- destinations


@pytest.mark.parametrize(
    "destination",
    [
        "https://evil.example/",
        "https://console.aws.amazon.com@evil.example/",
        "https://evil.example/console.aws.amazon.com",
        "//evil.example",
        "/\\evil.example",
        "%2F%2Fevil.example",
        "/%2F%2Fevil.example",
        "javascript:alert(1)",
        "data:text/html,hi",
        "HTTPS://evil.example",
        "https://console.aws.amazon.com:8443/",
        "https://console.aws.amazon.com./",
        "https://cónsole.aws.amazon.com/",
        "https://console.amazonaws.cn/",
    ],
)
def test_destinations_off_the_console_are_refused(
    live: ConsoleBroker, federation: FederationServer, destination: str
) -> None:
    before = len(federation.records)
    response = live.api("alice", role_arn=ADMIN_ROLE, destination=destination)
    assert response.status_code == 400
    assert "destination" in response.json()["message"]
    live.sign_in_browser("alice")
    browser = requests.get(
        f"{live.url}/console",
        params={"role_arn": ADMIN_ROLE, "destination": destination},
        allow_redirects=False,
        timeout=30,
    )
    assert browser.status_code == 400
    assert "Location" not in browser.headers
    assert len(federation.records) == before


# --------------------------------------------------------------------------- partitions


@pytest.mark.parametrize(
    ("role_arn", "region", "console_host"),
    [
        (ADMIN_ROLE, None, "console.aws.amazon.com"),
        (ADMIN_ROLE, "ap-southeast-2", "ap-southeast-2.console.aws.amazon.com"),
        (GOV_ROLE, "us-gov-west-1", "console.amazonaws-us-gov.com"),
        (CN_ROLE, "cn-north-1", "console.amazonaws.cn"),
    ],
)
def test_each_partition_lands_on_its_own_console(
    live: ConsoleBroker,
    federation: FederationServer,
    role_arn: str,
    region: str | None,
    console_host: str,
) -> None:
    body: dict[str, Any] = {"role_arn": role_arn, "destination": "s3"}
    if region:
        body["region"] = region
    response = live.api("alice", **body)
    assert response.status_code == 200, response.text
    destination = urlsplit(_login_params(response.json()["url"], federation)["Destination"])
    assert destination.netloc == console_host
    assert destination.path == "/s3/home"


@pytest.mark.parametrize(
    ("role_arn", "region"),
    [(ADMIN_ROLE, "us-gov-west-1"), (GOV_ROLE, "us-east-1"), (CN_ROLE, "eu-west-1")],
)
def test_a_region_outside_the_roles_partition_is_refused(
    live: ConsoleBroker, federation: FederationServer, role_arn: str, region: str
) -> None:
    before = len(federation.records)
    response = live.api("alice", role_arn=role_arn, region=region)
    assert response.status_code == 400
    assert "partition" in response.json()["message"]
    assert len(federation.records) == before


# --------------------------------------------------------------------------- SessionDuration


def test_session_duration_is_sent_and_reported(
    live: ConsoleBroker, federation: FederationServer
) -> None:
    response = live.api("alice", role_arn=ADMIN_ROLE, session_duration=43200)
    assert response.status_code == 200, response.text
    body = response.json()
    assert federation.records[-1].session_duration == 43200
    assert body["session_source"] == "session_duration"
    assert body["session_duration_seconds"] == 43200
    lasts = (_at(body["session_expires_at"]) - datetime.now(UTC)).total_seconds()
    assert 43190 <= lasts <= 43205


def test_session_duration_is_left_out_when_not_asked(
    live: ConsoleBroker, federation: FederationServer
) -> None:
    body = live.api("bob", role_arn=USER_ROLE).json()
    assert federation.records[-1].session_duration is None
    assert body["session_source"] == "credentials"
    assert 0 < body["session_duration_seconds"] <= 3600


def test_session_duration_beyond_the_rules_maximum_is_refused(
    live: ConsoleBroker, federation: FederationServer
) -> None:
    # Bob's rule allows at most 3600 seconds: a console session may not outlast that.
    before = len(federation.records)
    response = live.api("bob", role_arn=USER_ROLE, session_duration=7200)
    assert response.status_code == 400
    assert "session_duration may be at most 3600" in response.json()["message"]
    assert len(federation.records) == before
    allowed = live.api("bob", role_arn=USER_ROLE, session_duration=3600)
    assert allowed.status_code == 200, allowed.text
    assert federation.records[-1].session_duration == 3600


@pytest.mark.parametrize("duration", [899, 43201])
def test_session_duration_out_of_aws_bounds_is_400(
    live: ConsoleBroker, federation: FederationServer, duration: int
) -> None:
    before = len(federation.records)
    response = live.api("alice", role_arn=ADMIN_ROLE, session_duration=duration)
    assert response.status_code == 400
    assert "900 and 43200" in response.json()["message"]
    assert len(federation.records) == before


# --------------------------------------------------------------------------- failures


def test_federation_endpoint_refusal_is_a_clear_502(
    live: ConsoleBroker, federation: FederationServer
) -> None:
    federation.state.forced_response = (
        400,
        "<html><h1>HTTP Status 400 - Invalid credentials parameter</h1></html>",
    )
    response = live.api("alice", role_arn=ADMIN_ROLE)
    assert response.status_code == 502
    body = response.json()
    assert body["error"] == "upstream_error"
    assert "Invalid credentials parameter" in body["message"]
    live.sign_in_browser("alice")
    browser = requests.get(
        f"{live.url}/console?role_arn={ADMIN_ROLE}", allow_redirects=False, timeout=30
    )
    assert browser.status_code == 502


def test_federation_endpoint_timeout_is_a_502(stack: Stack) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/federation"
        overrides = {"federation_url": url, "timeout_seconds": 0.5}
        with serve_console(stack, console=overrides) as broker:
            response = broker.api("alice", role_arn=ADMIN_ROLE)
        assert response.status_code == 502
        assert "timed out" in response.json()["message"]


def test_no_log_record_holds_the_sign_in_url(
    live: ConsoleBroker, federation: FederationServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = live.api("alice", role_arn=ADMIN_ROLE, destination="s3").json()["url"]
    live.sign_in_browser("alice")
    redirect = requests.get(
        f"{live.url}/console?role_arn={ADMIN_ROLE}", allow_redirects=False, timeout=30
    )
    assert redirect.status_code == 302
    secrets_seen = [url, redirect.headers["Location"], "SigninToken="]
    secrets_seen += [record.signin_token for record in federation.records[-2:]]
    assert any(getattr(r, "audit", {}).get("event") == "console_signin" for r in caplog.records)
    for record in caplog.records:
        text = record.getMessage() + repr(record.__dict__)
        for secret in secrets_seen:
            assert secret not in text


# --------------------------------------------------------------------------- no STS call


@dataclass
class Guarded:
    """One broker whose every STS call is counted, alice signed in for ``GET /console``,
    and an ID token of hers for the API (refused choices never get as far as using it)."""

    broker: ConsoleBroker
    sts: CountingSTS
    token: str
    nonce: str

    def api(self, **body: Any) -> requests.Response:
        return requests.post(
            f"{self.broker.url}/v1/console-url",
            json={"provider": DEV_PROVIDER, "token": self.token, "nonce": self.nonce, **body},
            timeout=30,
        )

    def browser(self, **params: Any) -> requests.Response:
        return requests.get(
            f"{self.broker.url}/console",
            params=params,
            headers={"Accept": "application/json"},
            allow_redirects=False,
            timeout=30,
        )


@pytest.fixture(scope="module")
def guarded(stack: Stack, federation: FederationServer) -> Iterator[Guarded]:
    settings = make_settings(stack, "http://127.0.0.1:1")
    real = BotocoreSTS(settings.sts)
    sts = CountingSTS(real)
    try:
        with serve_console(
            stack,
            sts=sts,
            console={"federation_url": federation.url},
            # Hundreds of refused requests from one address: not what is tested here.
            rate_limit={"per_ip_per_minute": 0, "per_identity_per_minute": 0},
            # No cache: a request that reached the minting step would call STS every time,
            # so every row can see it (with a cache only the first would).
            cache={"enabled": False},
        ) as broker:
            broker.sign_in_browser("alice")
            nonce = secrets.token_urlsafe(16)
            yield Guarded(
                broker=broker, sts=sts, token=id_token(stack, "alice", nonce), nonce=nonce
            )
    finally:
        real.close()


def _refused(response: requests.Response, needle: str) -> None:
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == "invalid_request"
    assert needle in body["message"]
    assert "Location" not in response.headers


# Every door, with and without a role named.
DOORS = [
    ("POST /v1/console-url", {"role_arn": ADMIN_ROLE}),
    ("POST /v1/console-url", {}),
    ("GET /console", {"role_arn": ADMIN_ROLE}),
    ("GET /console", {}),
]


def _ask(guarded: Guarded, door: str, **fields: Any) -> requests.Response:
    return guarded.api(**fields) if door.startswith("POST") else guarded.browser(**fields)


@pytest.mark.parametrize("destination", HOSTILE_DESTINATIONS)
def test_a_hostile_destination_costs_no_sts_call_on_any_door(
    guarded: Guarded, federation: FederationServer, destination: str
) -> None:
    before, tokens = guarded.sts.calls, len(federation.records)
    for door, role in DOORS:
        _refused(_ask(guarded, door, destination=destination, **role), "destination")
    assert guarded.sts.calls == before
    assert len(federation.records) == tokens


# Bad in every partition, and bad for the role the rules choose for alice (commercial).
REGIONS_REFUSED = [*BAD_REGIONS, "us-gov-west-1", "cn-north-1"]


@pytest.mark.parametrize("region", REGIONS_REFUSED)
def test_a_bad_region_costs_no_sts_call_on_any_door(guarded: Guarded, region: str) -> None:
    before = guarded.sts.calls
    for door, role in DOORS:
        _refused(_ask(guarded, door, region=region, **role), "region")
    assert guarded.sts.calls == before


@pytest.mark.parametrize(
    ("door", "value", "needle"),
    [
        *(("POST /v1/console-url", v, "900 and 43200") for v in (0, -900, 899, 43201, 10**9)),
        *(("POST /v1/console-url", v, "must be a number") for v in ("3600", True, 3600.5)),
        *(("GET /console", v, "900 and 43200") for v in ("0", "899", "43201")),
        *(
            ("GET /console", v, "whole number of seconds")
            for v in ("1h", "-900", "3600.0", "\uff19\uff10\uff10", "0x384", "9" * 7)
        ),
    ],
)
@pytest.mark.parametrize("role", [{"role_arn": ADMIN_ROLE}, {}], ids=["role", "no role"])
def test_a_bad_session_duration_costs_no_sts_call(
    guarded: Guarded, door: str, value: Any, needle: str, role: dict[str, str]
) -> None:
    before = guarded.sts.calls
    _refused(_ask(guarded, door, session_duration=value, **role), needle)
    assert guarded.sts.calls == before


@pytest.mark.parametrize("role", [{"role_arn": USER_ROLE}, {}], ids=["role", "no role"])
def test_a_session_beyond_the_rule_costs_no_sts_call(
    guarded: Guarded, role: dict[str, str]
) -> None:
    nonce = secrets.token_urlsafe(16)
    before = guarded.sts.calls
    response = requests.post(
        f"{guarded.broker.url}/v1/console-url",
        json={
            "provider": DEV_PROVIDER,
            "token": id_token(guarded.broker.stack, "bob", nonce),
            "nonce": nonce,
            "session_duration": 7200,  # bob's rule allows 3600
            **role,
        },
        timeout=30,
    )
    _refused(response, "session_duration may be at most 3600")
    assert guarded.sts.calls == before


@pytest.mark.parametrize("door", ["POST /v1/console-url", "GET /console"])
def test_the_counter_sees_a_good_sign_in(guarded: Guarded, door: str) -> None:
    """The guard above can fail: a good request through the same doors calls STS."""
    before = guarded.sts.calls
    response = _ask(guarded, door, destination="s3")
    assert response.status_code in {200, 302}, response.text
    assert guarded.sts.calls == before + 1
