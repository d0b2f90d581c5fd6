"""The browser sign-in flow end to end, over real sockets: the broker, the local OIDC
provider (oidc-provider-mock), redis-server and moto. A ``requests.Session`` plays the
browser (cookie jar, no automatic redirects, so every hop is checked).

Each rejection is its own test: bad, missing and replayed ``state``, a callback in
another browser, wrong nonce, PKCE mismatch, provider errors, session fixation, idle and
absolute timeouts, an expired upstream token, CSRF on logout and on credentials.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import logging
import re
import time
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import boto3
import pytest
import requests
from botocore.config import Config

from broker.devstack.federation_server import start_federation_server
from broker.devstack.oidc_server import DEMO_USERS
from broker.devstack.processes import free_port
from broker.devstack.social_servers import SocialServers, start_social_servers
from broker.devstack.stack import ADMIN_ROLE, DEMO_BUCKET, DEV_CLIENT_ID, USER_ROLE, Stack
from broker.sessions import SessionStore
from tests.conftest import LiveBroker, make_settings, serve
from tests.redis_ha import RedisTarget, keys_matching

pytestmark = pytest.mark.integration

TIMEOUT = 15


def demo_sub(name: str) -> str:
    """The demo user's subject at the local provider (``alice`` -> its ``sub``)."""
    for user in DEMO_USERS:
        sub = str(user["sub"])
        if sub == name or sub.split("@", maxsplit=1)[0] == name:
            return sub
    raise LookupError(name)


def set_cookies(response: requests.Response) -> list[str]:
    return list(response.raw.headers.getlist("Set-Cookie"))


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


class WebClient:
    """A cookie-keeping HTTP client that follows no redirect by itself."""

    def __init__(self, broker: LiveBroker) -> None:
        self.broker = broker
        self.http = requests.Session()

    def url(self, path: str) -> str:
        return path if path.startswith("http") else f"{self.broker.url}{path}"

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.http.get(self.url(path), allow_redirects=False, timeout=TIMEOUT, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.http.post(self.url(path), allow_redirects=False, timeout=TIMEOUT, **kwargs)

    @property
    def cookie_name(self) -> str:
        return self.broker.settings.web.session_cookie

    def session_id(self) -> str | None:
        return self.http.cookies.get(self.cookie_name)

    # -- the flow, hop by hop -------------------------------------------------------

    def start(self, provider: str = "demo", next_path: str | None = None) -> str:
        """GET /login/<provider>: the provider authorization URL we are sent to."""
        params = {} if next_path is None else {"next": next_path}
        r = self.get(f"/login/{provider}", params=params)
        assert r.status_code == 302, r.text
        return r.headers["Location"]

    def authorize(self, authorize_url: str, sub: str) -> str:
        """The person signs in at the provider: the callback URL it sends us back to."""
        r = self.http.post(authorize_url, data={"sub": sub}, allow_redirects=False, timeout=15)
        assert r.status_code == 302, r.text
        return r.headers["Location"]

    def deny(self, authorize_url: str) -> str:
        r = self.http.post(
            authorize_url, data={"action": "deny"}, allow_redirects=False, timeout=TIMEOUT
        )
        assert r.status_code == 302, r.text
        return r.headers["Location"]

    def login(self, user: str = "alice", next_path: str | None = None) -> requests.Response:
        callback = self.authorize(self.start(next_path=next_path), demo_sub(user))
        return self.get(callback)

    def csrf(self) -> str:
        r = self.get("/v1/session")
        assert r.status_code == 200, r.text
        token: str = r.json()["csrf_token"]
        return token


def sessions(broker: LiveBroker) -> SessionStore:
    return SessionStore(
        store=broker.services.store,
        idle_seconds=broker.settings.web.session_idle_seconds,
        absolute_seconds=broker.settings.web.session_absolute_seconds,
    )


def rewrite_session(broker: LiveBroker, session_id: str, **changes: Any) -> None:
    """Edit a stored session the way time would (the test cannot wait an hour)."""
    store = broker.services.store
    key = sessions(broker).key(session_id)
    data = store.get_sealed(key)
    assert isinstance(data, dict)
    data.update(changes)
    store.set_sealed(key, data, ttl=600)


def pending_login(broker: LiveBroker, state: str) -> Mapping[str, Any] | None:
    store = broker.services.store
    data = store.get_sealed(store.key("login", hashlib.sha256(state.encode()).hexdigest()))
    return data if isinstance(data, dict) else None


def s256(verifier: str) -> str:
    return (
        base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    )


def assert_html_error(r: requests.Response, status: int, code: str | None = None) -> None:
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("text/html")
    assert "Traceback" not in r.text
    if code is not None:
        assert f'<code id="error-code">{code}</code>' in r.text, r.text


@pytest.fixture(scope="module")
def shared_broker(stack: Stack, redis_target: RedisTarget) -> Iterator[LiveBroker]:
    """One broker for most tests: each test has its own WebClient (its own cookie jar),
    so tests stay independent while the module avoids a server start and stop per test.
    Rate limits are off because every request comes from 127.0.0.1. Every test using it
    runs twice: sessions on a standalone Redis and on a Cluster (``redis_target``)."""
    port = free_port()
    settings = make_settings(
        stack,
        f"http://127.0.0.1:{port}",
        rate_limit={"per_ip_per_minute": 0, "per_identity_per_minute": 0},
        redis=redis_target.section,
    )
    with serve(settings, stack, port) as live:
        yield live
    gc.collect()  # see tests.redis_ha.close_clients


@pytest.fixture
def web(shared_broker: LiveBroker) -> Iterator[WebClient]:
    client = WebClient(shared_broker)
    yield client
    client.http.close()


# ------------------------------------------------------------------ the happy path


def test_login_page_lists_the_providers(web: WebClient) -> None:
    r = web.get("/login")
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/html")
    assert 'href="/login/demo"' in r.text
    assert "Demo OpenID Connect provider" in r.text
    assert r.headers["Cache-Control"] == "no-store"


def test_home_without_session_redirects_to_login(web: WebClient) -> None:
    r = web.get("/")
    assert r.status_code == 303
    assert r.headers["Location"] == "/login"
    r = web.get("/credentials")
    assert r.status_code == 303
    assert r.headers["Location"] == "/login?next=%2Fcredentials"


def test_authorization_request_has_pkce_s256_state_and_nonce(web: WebClient) -> None:
    url = web.start()
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == web.broker.stack.oidc.url
    q = query(url)
    assert q["response_type"] == "code"
    assert q["client_id"] == DEV_CLIENT_ID
    assert q["redirect_uri"] == f"{web.broker.url}/callback/demo"
    assert set(q["scope"].split()) == {"openid", "email", "profile"}
    assert q["code_challenge_method"] == "S256"
    assert len(q["state"]) >= 43
    assert len(q["nonce"]) >= 43
    # Nothing secret rides in the URL: the verifier and the next path stay in Redis.
    assert "code_verifier" not in q
    assert "next" not in q

    pending = pending_login(web.broker, q["state"])
    assert pending is not None
    assert pending["nonce"] == q["nonce"]
    assert 43 <= len(pending["code_verifier"]) <= 128
    assert q["code_challenge"] == s256(pending["code_verifier"])
    # Sealed at rest and short-lived.
    store = web.broker.services.store
    key = store.key("login", hashlib.sha256(q["state"].encode()).hexdigest())
    raw = store.client.get(key)
    assert isinstance(raw, bytes)
    assert pending["code_verifier"].encode() not in raw
    ttl = store.ttl_seconds(key)
    assert ttl is not None
    assert 0 < ttl <= web.broker.settings.web.login_state_ttl_seconds
    # The browser is bound to the login by a cookie.
    login_cookies = [c for c in web.http.cookies if c.name == f"{web.cookie_name}_login"]
    assert len(login_cookies) == 1


def test_every_login_start_renews_the_binding_cookie(web: WebClient) -> None:
    """Its lifetime must cover the newest pending login, not the first one: a login
    started just before the cookie expired would otherwise fail at the callback. Each
    start binds its login to a value of its own, and keeps the earlier one (the first
    tab's login still completes: test_sso_mixup.py)."""
    name = f"{web.cookie_name}_login"
    first = web.get("/login/demo")
    again = web.get("/login/demo")
    values = []
    for r in (first, again):
        [cookie] = [c for c in set_cookies(r) if c.startswith(f"{name}=")]
        assert f"Max-Age={web.broker.settings.web.login_state_ttl_seconds}" in cookie
        values.append(cookie.split(";")[0].split("=", 1)[1])
    assert values[1].split(".") == [values[1].split(".")[0], values[0]]


def test_full_flow_login_roles_credentials_logout(broker: LiveBroker) -> None:
    # Its own broker (and key prefix): it counts every cached credential in Redis.
    web = WebClient(broker)
    r = web.login("alice")
    assert r.status_code == 303
    assert r.headers["Location"] == "/"
    cookie = next(c for c in set_cookies(r) if c.startswith(f"{web.cookie_name}="))
    attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "path", "max-age"} <= attributes
    assert "samesite=lax" in cookie.lower()
    assert "secure" not in attributes  # the dev stack runs on plain http
    session_id = web.session_id()
    assert session_id is not None
    assert len(session_id) >= 43

    # Redis holds the session under a digest of the id, sealed, with a TTL.
    store = broker.services.store
    key = sessions(broker).key(session_id)
    raw = store.client.get(key)
    assert isinstance(raw, bytes)
    assert session_id.encode() not in raw
    assert b"alice" not in raw
    ttl = store.ttl_seconds(key)
    assert ttl is not None
    assert ttl <= broker.settings.web.session_idle_seconds

    home = web.get("/")
    assert home.status_code == 200
    assert demo_sub("alice") in home.text
    assert ADMIN_ROLE in home.text
    assert USER_ROLE in home.text
    assert home.headers["Cache-Control"] == "no-store"

    csrf = web.csrf()
    page = web.post("/credentials", data={"csrf_token": csrf, "role_arn": ADMIN_ROLE})
    assert page.status_code == 200, page.text
    assert page.headers["Cache-Control"] == "no-store"
    match = re.search(r'id="access-key-id">([A-Z0-9]+)<', page.text)
    assert match is not None
    access_key = match.group(1)
    assert f"export AWS_ACCESS_KEY_ID={access_key}" in page.text
    assert f"$Env:AWS_ACCESS_KEY_ID = &#39;{access_key}&#39;" in page.text
    assert f"aws_access_key_id = {access_key}" in page.text
    assert "[profile BrokerDemoAdmin]" in page.text  # an ~/.aws/config profile, with region
    assert "data-countdown" in page.text

    # The same session, as a JSON client: the cached credentials, and they work.
    r = web.post(
        "/v1/session/credentials",
        json={"role_arn": ADMIN_ROLE},
        headers={"X-CSRF-Token": csrf},
    )
    assert r.status_code == 200, r.text
    assert r.headers["Cache-Control"] == "no-store"
    creds = r.json()["credentials"]
    assert creds["AccessKeyId"] == access_key
    s3 = boto3.client(
        "s3",
        endpoint_url=broker.stack.moto.url,
        region_name="us-east-1",
        aws_access_key_id=creds["AccessKeyId"],
        aws_secret_access_key=creds["SecretAccessKey"],
        aws_session_token=creds["SessionToken"],
        config=Config(retries={"total_max_attempts": 1}),
    )
    s3.list_objects_v2(Bucket=DEMO_BUCKET)

    prefix = broker.settings.redis.key_prefix
    assert keys_matching(store.client, f"{prefix}creds:*")
    r = web.post("/logout", data={"csrf_token": csrf})
    assert r.status_code == 303
    assert r.headers["Location"] == "/login?signed_out=1"
    assert any(c.startswith(f"{web.cookie_name}=;") for c in set_cookies(r))
    assert store.client.get(key) is None
    # The identity's cached credentials are gone too.
    assert not keys_matching(store.client, f"{prefix}creds:*")
    assert web.get("/").status_code == 303
    r = web.get("/login?signed_out=1")
    assert 'id="signed-out"' in r.text
    # The old cookie value, replayed, is worth nothing.
    r = requests.get(
        f"{broker.url}/v1/session", cookies={web.cookie_name: session_id}, timeout=TIMEOUT
    )
    assert r.status_code == 401


def test_user_with_one_role_gets_it_by_default(web: WebClient) -> None:
    web.login("bob")
    r = web.post("/credentials", data={"csrf_token": web.csrf()})
    assert r.status_code == 200, r.text
    assert USER_ROLE in r.text


def test_choose_role_form(web: WebClient) -> None:
    web.login("alice")
    r = web.get("/credentials", params={"role_arn": USER_ROLE})
    assert r.status_code == 200
    assert f'<option value="{USER_ROLE}" selected>' in r.text


def test_identity_without_a_rule_sees_why(web: WebClient) -> None:
    web.login("mallory")
    home = web.get("/")
    assert home.status_code == 200
    assert 'id="no-roles"' in home.text
    why = "your e-mail address is not verified at Demo OpenID Connect provider"
    assert why in home.text
    r = web.post("/credentials", data={"csrf_token": web.csrf()})
    assert_html_error(r, 403, "no_matching_rule")
    # The page starts the message with a capital, and heads it with what happened.
    assert f'<p class="error" id="error-message">{why[:1].upper()}{why[1:]}</p>' in r.text
    assert "<h1>No AWS access for this account</h1>" in r.text
    assert "Your roles" in r.text  # signed in, and not signing in: the roles are a way on


def test_role_not_allowed_is_a_403_page(web: WebClient) -> None:
    web.login("bob")
    r = web.post("/credentials", data={"csrf_token": web.csrf(), "role_arn": ADMIN_ROLE})
    assert_html_error(r, 403, "role_not_allowed")
    assert f"it may choose: {USER_ROLE}" in r.text  # the roles bob may pick instead


def test_session_json(web: WebClient) -> None:
    r = web.get("/v1/session")
    assert r.status_code == 401
    assert r.json()["error"] == "unauthenticated"
    web.login("alice")
    body = web.get("/v1/session").json()
    assert body["provider"] == "demo"
    assert body["subject"] == demo_sub("alice")
    assert body["roles"] == [ADMIN_ROLE, USER_ROLE]
    assert body["identity_id"].startswith("us-east-1:")
    assert body["token_expired"] is False


def test_json_credentials_errors_stay_json(web: WebClient) -> None:
    web.login("bob")
    csrf = web.csrf()
    r = web.post(
        "/v1/session/credentials", json={"role_arn": ADMIN_ROLE}, headers={"X-CSRF-Token": csrf}
    )
    assert r.status_code == 403
    assert r.json()["error"] == "role_not_allowed"
    r = web.post("/v1/session/credentials", json={"nope": 1}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_request"


def test_json_session_routes_answer_http_errors_like_the_api(web: WebClient) -> None:
    """Same codes and headers as POST /v1/credentials, not a generic http_error."""
    web.login("bob")
    csrf = web.csrf()
    too_big = web.broker.settings.server.max_body_bytes + 1
    r = web.post(
        "/v1/session/credentials",
        data=b'{"role_arn": "' + b"a" * too_big + b'"}',
        headers={"X-CSRF-Token": csrf, "Content-Type": "application/json"},
    )
    assert r.status_code == 413
    assert r.json()["error"] == "request_too_large"
    r = web.http.delete(web.url("/v1/session"), timeout=TIMEOUT)
    assert r.status_code == 405
    assert r.json()["error"] == "method_not_allowed"
    assert "GET" in r.headers["Allow"]


def test_next_path_survives_the_round_trip(web: WebClient) -> None:
    r = web.login("alice", next_path="/credentials?role_arn=" + USER_ROLE)
    assert r.status_code == 303
    assert r.headers["Location"] == "/credentials?role_arn=" + USER_ROLE


def test_security_headers(web: WebClient) -> None:
    r = web.get("/login")
    csp = r.headers["Content-Security-Policy"]
    directives = {d.split()[0]: d.split()[1:] for d in csp.split("; ")}
    assert directives["default-src"] == ["'none'"]
    assert directives["script-src"] == ["'self'"]
    assert directives["style-src"] == ["'self'"]
    assert directives["frame-ancestors"] == ["'none'"]
    assert directives["form-action"][0] == "'self'"
    assert "'unsafe-inline'" not in csp
    assert r.headers["X-Frame-Options"] == "DENY"
    assert r.headers["Referrer-Policy"] == "no-referrer"
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert "<script>" not in r.text  # no inline scripts: only <script src=...>
    api = web.get("/v1/session")
    assert api.headers["Content-Security-Policy"].startswith("default-src 'none'")
    static = web.get("/static/broker.js")
    assert static.status_code == 200
    assert "javascript" in static.headers["Content-Type"]


# ------------------------------------------------------------------ state, nonce, PKCE


def test_unknown_state_is_refused(web: WebClient) -> None:
    web.start()  # a binding cookie, so only the state is wrong
    r = web.get("/callback/demo", params={"state": "x" * 43, "code": "abc"})
    assert_html_error(r, 400, "invalid_request")
    assert "unknown, expired or was already used" in r.text


def test_missing_state_is_refused(web: WebClient) -> None:
    r = web.get("/callback/demo", params={"code": "abc"})
    assert_html_error(r, 400, "invalid_request")


def test_replayed_state_is_refused(web: WebClient) -> None:
    callback = web.authorize(web.start(), demo_sub("alice"))
    assert web.get(callback).status_code == 303
    replay = web.get(callback)
    assert_html_error(replay, 400, "invalid_request")
    assert "already used" in replay.text


def test_state_for_another_provider_is_refused(stack: Stack) -> None:
    """A state issued for one provider cannot complete a login at another."""
    port = free_port()
    twin = {
        "type": "oidc",
        "issuer": stack.oidc.url,
        "client_ids": [DEV_CLIENT_ID],
        "client_secret": "demo-client-secret",
    }
    settings = make_settings(stack, f"http://127.0.0.1:{port}", providers={"twin": twin})
    with serve(settings, stack, port) as broker:
        web = WebClient(broker)
        callback = web.authorize(web.start("demo"), demo_sub("alice"))
        r = web.get(callback.replace("/callback/demo", "/callback/twin"))
        assert_html_error(r, 400, "invalid_request")
        assert "another provider" in r.text
        assert web.session_id() is None


def test_callback_in_another_browser_is_refused(shared_broker: LiveBroker) -> None:
    broker = shared_broker
    """Login CSRF: the attacker's callback URL, opened by the victim, signs nobody in."""
    attacker, victim = WebClient(broker), WebClient(broker)
    callback = attacker.authorize(attacker.start(), demo_sub("mallory"))
    r = victim.get(callback)
    assert_html_error(r, 400, "invalid_request")
    assert "another browser" in r.text
    assert victim.session_id() is None
    # ... and the state was used up by the attempt.
    assert_html_error(attacker.get(callback), 400, "invalid_request")


def _authorize_with(web: WebClient, broker_url: str, **overrides: str) -> tuple[str, str]:
    """Start a login at the broker, then go to the provider with some parameters of the
    authorization request changed (what an attacker splicing requests would do).
    Returns (callback URL, original state)."""
    url = web.start()
    params = query(url)
    params.update(overrides)
    base = url.split("?", 1)[0]
    return web.authorize(f"{base}?{urlencode(params)}", demo_sub("alice")), params["state"]


def test_wrong_nonce_is_refused(web: WebClient) -> None:
    # The provider issues an ID token for a nonce our login did not send.
    callback, _ = _authorize_with(web, web.broker.url, nonce="attacker-chosen-nonce-0123456789")
    r = web.get(callback)
    assert_html_error(r, 401, "invalid_token")
    assert "Wrong nonce" in r.text
    assert "<h1>The sign-in could not be verified</h1>" in r.text
    assert "Your roles" not in r.text  # a failed sign-in has no roles to show
    assert web.session_id() is None


def test_pkce_verifier_mismatch_is_refused(web: WebClient) -> None:
    # The provider binds the code to a challenge whose verifier the broker does not hold.
    foreign = s256("an-attacker-verifier-" + "x" * 40)
    callback, _ = _authorize_with(web, web.broker.url, code_challenge=foreign)
    r = web.get(callback)
    assert_html_error(r, 401, "invalid_token")
    assert "refused the authorization code" in r.text
    assert web.session_id() is None


def test_provider_rejects_a_wrong_code_verifier_directly(web: WebClient) -> None:
    """The local provider enforces PKCE: the same code with the right verifier works."""
    url = web.start()
    q = query(url)
    pending = pending_login(web.broker, q["state"])
    assert pending is not None
    code = query(web.authorize(url, demo_sub("alice")))["code"]
    token_url = f"{web.broker.stack.oidc.url}/oauth2/token"
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": q["redirect_uri"],
        "client_id": DEV_CLIENT_ID,
        "client_secret": "demo-client-secret",
    }
    wrong = requests.post(token_url, data={**form, "code_verifier": "w" * 64}, timeout=TIMEOUT)
    assert wrong.status_code == 400
    assert wrong.json()["error"] == "invalid_grant"


def test_provider_error_shows_a_clear_page(web: WebClient) -> None:
    callback = web.deny(web.start())
    assert query(callback)["error"] == "access_denied"
    r = web.get(callback)
    assert_html_error(r, 403, "access_denied")
    assert "cancelled or refused" in r.text
    assert web.session_id() is None


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        ("access_denied", 403, "access_denied"),
        ("login_required", 403, "access_denied"),
        ("temporarily_unavailable", 503, "dependency_unavailable"),
        ("server_error", 502, "upstream_error"),
        ("invalid_scope", 502, "upstream_error"),
        ("<script>alert(1)</script>", 502, "upstream_error"),
    ],
)
def test_provider_error_codes(web: WebClient, error: str, status: int, code: str) -> None:
    state = query(web.start())["state"]
    r = web.get(
        "/callback/demo",
        params={"state": state, "error": error, "error_description": "<b>why</b>"},
    )
    assert_html_error(r, status, code)
    assert "<script>alert" not in r.text
    assert "<b>why</b>" not in r.text
    # The state was used up: the same response cannot be replayed with a code.
    assert pending_login(web.broker, state) is None


def test_provider_text_only_shown_for_our_own_login(web: WebClient) -> None:
    """A crafted link cannot put an attacker's words on the broker's page."""
    r = web.get(
        "/callback/demo",
        params={"error": "server_error", "error_description": "Call 555-0100 to unlock"},
    )
    assert_html_error(r, 502, "upstream_error")
    assert "555-0100" not in r.text
    state = query(web.start())["state"]
    r = web.get(
        "/callback/demo",
        params={"state": state, "error": "server_error", "error_description": "IdP is down"},
    )
    assert "IdP is down" in r.text


def test_unknown_provider(web: WebClient) -> None:
    assert_html_error(web.get("/login/nope"), 400, "unknown_provider")
    assert_html_error(web.get("/callback/nope"), 400, "unknown_provider")


def test_missing_code_is_refused(web: WebClient) -> None:
    state = query(web.start())["state"]
    assert_html_error(web.get("/callback/demo", params={"state": state}), 400)


# ------------------------------------------------------------------ sessions


def test_session_id_is_rotated_at_login_no_fixation(shared_broker: LiveBroker) -> None:
    broker = shared_broker
    attacker, victim = WebClient(broker), WebClient(broker)
    attacker.login("bob")
    planted = attacker.session_id()
    assert planted is not None
    # The attacker plants their own live session id (and a made-up one) in the victim's
    # browser, then the victim signs in.
    victim.http.cookies.set(victim.cookie_name, planted, domain="127.0.0.1", path="/")
    victim.login("alice")
    fresh = victim.session_id()
    assert fresh is not None
    assert fresh != planted
    # The planted id died at the victim's sign-in: it cannot be used to ride along.
    r = requests.get(f"{broker.url}/v1/session", cookies={victim.cookie_name: planted}, timeout=15)
    assert r.status_code == 401
    assert victim.get("/v1/session").json()["subject"] == demo_sub("alice")

    made_up = "A" * 43
    third = WebClient(broker)
    third.http.cookies.set(third.cookie_name, made_up, domain="127.0.0.1", path="/")
    third.login("alice")
    assert third.session_id() not in {made_up, None}


def test_signing_in_again_replaces_the_session(web: WebClient) -> None:
    web.login("alice")
    first = web.session_id()
    web.login("bob")
    assert web.session_id() != first
    assert web.get("/v1/session").json()["subject"] == demo_sub("bob")


def test_idle_timeout(web: WebClient) -> None:
    web.login("alice")
    session_id = web.session_id()
    assert session_id is not None
    idle = web.broker.settings.web.session_idle_seconds
    rewrite_session(web.broker, session_id, last_seen=int(time.time()) - idle - 1)
    r = web.get("/")
    assert r.status_code == 303
    assert r.headers["Location"] == "/login"
    page = web.get("/login")
    assert 'id="session-ended"' in page.text
    assert web.broker.services.store.client.get(sessions(web.broker).key(session_id)) is None


def test_absolute_timeout(web: WebClient) -> None:
    web.login("alice")
    session_id = web.session_id()
    assert session_id is not None
    absolute = web.broker.settings.web.session_absolute_seconds
    rewrite_session(web.broker, session_id, created_at=int(time.time()) - absolute - 1)
    assert web.get("/v1/session").status_code == 401


def test_session_is_touched_on_use(web: WebClient) -> None:
    web.login("alice")
    session_id = web.session_id()
    assert session_id is not None
    old = int(time.time()) - 120
    rewrite_session(web.broker, session_id, last_seen=old)
    assert web.get("/").status_code == 200
    data = web.broker.services.store.get_sealed(sessions(web.broker).key(session_id))
    assert isinstance(data, dict)
    assert data["last_seen"] > old


def test_a_late_touch_cannot_revive_a_signed_out_session(web: WebClient) -> None:
    """A request that read the session just before sign-out must not write it back."""
    web.login("alice")
    session_id = web.session_id()
    assert session_id is not None
    store = sessions(web.broker)
    loaded = store.load(session_id)
    assert loaded is not None
    assert web.post("/logout", data={"csrf_token": loaded.csrf_token}).status_code == 303
    assert store.save(loaded) is False
    assert web.broker.services.store.client.get(store.key(session_id)) is None


def test_expired_upstream_token_asks_to_sign_in_again(web: WebClient) -> None:
    web.login("alice")
    session_id = web.session_id()
    assert session_id is not None
    rewrite_session(
        web.broker, session_id, token_expires_at=int(time.time()) - 5, refresh_token=None
    )
    home = web.get("/")
    assert home.status_code == 200
    assert 'id="token-expired"' in home.text
    csrf = web.csrf()
    r = web.post("/credentials", data={"csrf_token": csrf, "role_arn": USER_ROLE})
    assert_html_error(r, 401, "expired_token")
    assert 'id="sign-in-again" href="/login/demo"' in r.text
    r = web.post("/v1/session/credentials", json={}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 401
    assert r.json()["error"] == "expired_token"


def test_expired_upstream_token_with_refresh_token(web: WebClient) -> None:
    """The local provider issues refresh tokens but no new ID token on refresh, so the
    broker cannot renew an OIDC session's STS token: it must say so, not fail oddly."""
    web.login("alice")
    session_id = web.session_id()
    assert session_id is not None
    data = web.broker.services.store.get_sealed(sessions(web.broker).key(session_id))
    assert isinstance(data, dict)
    assert data["refresh_token"]
    rewrite_session(web.broker, session_id, token_expires_at=int(time.time()) - 5)
    r = web.post("/v1/session/credentials", json={}, headers={"X-CSRF-Token": web.csrf()})
    assert r.status_code == 401
    assert r.json()["error"] == "expired_token"


def test_tampered_session_is_refused(web: WebClient) -> None:
    web.login("alice")
    session_id = web.session_id()
    assert session_id is not None
    store = web.broker.services.store
    key = sessions(web.broker).key(session_id)
    raw = store.client.get(key)
    assert isinstance(raw, bytes)
    store.client.set(key, raw[:-1] + bytes([raw[-1] ^ 1]), ex=60)
    assert web.get("/v1/session").status_code == 401


# ------------------------------------------------------------------ CSRF


def test_logout_requires_the_csrf_token(web: WebClient) -> None:
    web.login("alice")
    for data in ({}, {"csrf_token": "wrong"}, {"csrf_token": ""}):
        r = web.post("/logout", data=data, headers={"Origin": "https://evil.example"})
        assert_html_error(r, 403, "access_denied")
    # Still signed in.
    assert web.get("/v1/session").status_code == 200


def test_logout_without_a_session_just_redirects(web: WebClient) -> None:
    r = web.post("/logout")
    assert r.status_code == 303


def test_credentials_form_requires_the_csrf_token(web: WebClient) -> None:
    web.login("alice")
    r = web.post("/credentials", data={"role_arn": USER_ROLE})
    assert_html_error(r, 403, "access_denied")


def test_json_credentials_require_the_csrf_header(web: WebClient) -> None:
    web.login("alice")
    for headers in ({}, {"X-CSRF-Token": "wrong"}):
        r = web.post("/v1/session/credentials", json={}, headers=headers)
        assert r.status_code == 403
        assert r.json()["error"] == "access_denied"


def test_credentials_without_a_session(web: WebClient) -> None:
    r = web.post("/credentials", data={"csrf_token": "x"})
    assert_html_error(r, 401, "unauthenticated")
    r = web.post("/v1/session/credentials", json={})
    assert r.status_code == 401
    assert r.json()["error"] == "unauthenticated"


# ------------------------------------------------------------------ Login with Amazon, Facebook

SOCIAL_RULE = {
    "name": "social-users",
    "providers": ["amazon", "facebook"],
    "conditions": [{"claim": "email", "op": "glob", "value": "*@example.com"}],
    "roles": [USER_ROLE],
    "max_duration_seconds": 3600,
}


@pytest.fixture(scope="module")
def social() -> Iterator[SocialServers]:
    with start_social_servers() as servers:
        yield servers


@pytest.fixture(scope="module")
def social_broker(stack: Stack, social: SocialServers) -> Iterator[LiveBroker]:
    port = free_port()
    settings = make_settings(
        stack,
        f"http://127.0.0.1:{port}",
        providers=social.provider_config(),
        rules=[SOCIAL_RULE],
        rate_limit={"per_ip_per_minute": 0, "per_identity_per_minute": 0},
    )
    with serve(settings, stack, port) as live:
        yield live


@pytest.fixture
def social_web(social_broker: LiveBroker) -> Iterator[WebClient]:
    client = WebClient(social_broker)
    yield client
    client.http.close()


def social_login(web: WebClient, provider: str, user: str = "alice") -> requests.Response:
    """The stand-ins' consent page is a list of links: the chosen one adds ``user=``."""
    authorize = web.start(provider)
    r = web.http.get(f"{authorize}&user={user}", allow_redirects=False, timeout=TIMEOUT)
    assert r.status_code == 302, r.text
    return web.get(r.headers["Location"])


@pytest.mark.parametrize("provider", ["amazon", "facebook"])
def test_social_provider_flow(social_web: WebClient, provider: str) -> None:
    q = query(social_web.start(provider))
    assert q["code_challenge_method"] == "S256"
    assert "nonce" not in q  # access tokens carry no nonce
    assert q["redirect_uri"] == f"{social_web.broker.url}/callback/{provider}"

    r = social_login(social_web, provider)
    assert r.status_code == 303, r.text
    session = social_web.get("/v1/session").json()
    assert session["provider"] == provider
    assert session["email"] == "alice@example.com"
    assert session["roles"] == [USER_ROLE]
    r = social_web.post(
        "/v1/session/credentials", json={}, headers={"X-CSRF-Token": session["csrf_token"]}
    )
    assert r.status_code == 200, r.text
    assert r.json()["role_arn"] == USER_ROLE


@pytest.mark.parametrize("provider", ["amazon", "facebook"])
def test_social_provider_enforces_our_pkce(social_web: WebClient, provider: str) -> None:
    """These stand-ins check the verifier: a code bound to a foreign challenge fails."""
    url = social_web.start(provider)
    params = query(url)
    params["code_challenge"] = s256("an-attacker-verifier-" + "y" * 40)
    spliced = f"{url.split('?', 1)[0]}?{urlencode(params)}&user=alice"
    r = social_web.http.get(spliced, allow_redirects=False, timeout=TIMEOUT)
    assert r.status_code == 302
    r = social_web.get(r.headers["Location"])
    assert_html_error(r, 401, "invalid_token")
    assert "refused the authorization code" in r.text
    assert social_web.session_id() is None


def test_an_unreachable_token_endpoint_logs_no_secret(
    stack: Stack, social: SocialServers, caplog: pytest.LogCaptureFixture
) -> None:
    """Facebook's code exchange is a GET with the app secret and the code in the query
    string; the transport error quotes that URL, so it must not reach the log."""
    providers = social.provider_config()
    providers["facebook"]["graph_url"] = f"http://127.0.0.1:{free_port()}"  # nothing listens
    port = free_port()
    settings = make_settings(
        stack,
        f"http://127.0.0.1:{port}",
        providers=providers,
        rules=[SOCIAL_RULE],
        rate_limit={"per_ip_per_minute": 0, "per_identity_per_minute": 0},
    )
    caplog.set_level(logging.DEBUG)
    with serve(settings, stack, port) as broker:
        web = WebClient(broker)
        authorize = web.start("facebook")
        r = web.http.get(f"{authorize}&user=alice", allow_redirects=False, timeout=TIMEOUT)
        assert r.status_code == 302, r.text
        callback = r.headers["Location"]
        r = web.get(callback)
        assert_html_error(r, 503, "dependency_unavailable")
        web.http.close()

    code = query(callback)["code"]
    # Everything but the test server's own access log (production runs with none).
    logged = "\n".join(
        caplog.handler.format(record) for record in caplog.records if record.name != "werkzeug"
    )
    assert "facebook token endpoint is unreachable" in logged
    assert social.facebook.app_secret not in logged
    assert code not in logged


def test_amazon_refresh_token_renews_an_expired_session_token(
    social_web: WebClient, social: SocialServers
) -> None:
    social_login(social_web, "amazon")
    session_id = social_web.session_id()
    assert session_id is not None
    key = sessions(social_web.broker).key(session_id)
    store = social_web.broker.services.store
    before = store.get_sealed(key)
    assert isinstance(before, dict)
    assert before["refresh_token"]
    rewrite_session(social_web.broker, session_id, token_expires_at=int(time.time()) - 5)
    refreshes = social.amazon.hits("/auth/o2/token")
    csrf = social_web.csrf()
    r = social_web.post("/v1/session/credentials", json={}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200, r.text
    assert social.amazon.hits("/auth/o2/token") == refreshes + 1
    after = store.get_sealed(key)
    assert isinstance(after, dict)
    assert after["token"] != before["token"]
    assert after["token_expires_at"] > time.time()


# ------------------------------------------------------------------ console sign-in


def test_console_button_uses_the_session(stack: Stack) -> None:
    """The console part finds the signed-in identity and CSRF token through this part."""
    with start_federation_server(sts_url=stack.moto.url) as federation:
        port = free_port()
        settings = make_settings(
            stack, f"http://127.0.0.1:{port}", console={"federation_url": federation.url}
        )
        with serve(settings, stack, port) as broker:
            web = WebClient(broker)
            r = web.post("/console", data={"role_arn": USER_ROLE})
            assert r.status_code == 303
            assert r.headers["Location"] == "/login?next=%2F"

            web.login("alice")
            home = web.get("/")
            assert 'action="/console"' in home.text
            csp = home.headers["Content-Security-Policy"]
            assert urlsplit(federation.url).netloc in csp  # the form may land there

            r = web.post("/console", data={"role_arn": USER_ROLE})
            assert r.status_code == 403
            r = web.post("/console", data={"role_arn": USER_ROLE, "csrf_token": web.csrf()})
            assert r.status_code == 303, r.text
            assert r.headers["Location"].startswith(f"{federation.url}?Action=login")
            assert len(federation.records) == 1
