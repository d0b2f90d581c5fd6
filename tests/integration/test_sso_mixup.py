"""The browser flow against mix-up and cookie attacks, end to end over real sockets.

* RFC 9207: a second local OIDC provider speaks it (discovery advertises
  ``authorization_response_iss_parameter_supported`` and every redirect carries ``iss``).
  A wrong ``iss`` (or none, from that provider) gets an error page and the code is never
  sent anywhere: the test redeems it itself afterwards, which the provider allows only
  for a code nobody redeemed before. The stack's provider, which does not advertise it,
  must accept a missing ``iss`` and refuse a wrong one; Login with Amazon and Facebook,
  which send none, refuse any (their token endpoints count requests: zero).
* Login binding: a value planted in the victim's cookie never binds the victim's login,
  so the victim's callback fails in the attacker's browser; several tabs still work.
* ``__Host-`` cookie names whenever cookies are Secure.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
import requests

from broker.devstack.oidc_server import start_oidc_provider
from broker.devstack.processes import ManagedProcess, free_port
from broker.devstack.social_servers import SocialServers, start_social_servers
from broker.devstack.stack import DEV_CLIENT_ID, DEV_PROVIDER, Stack
from broker.sessions import MAX_PENDING_LOGINS
from tests.conftest import LiveBroker, make_settings, serve
from tests.integration.test_sso_flow import (
    SOCIAL_RULE,
    TIMEOUT,
    WebClient,
    assert_html_error,
    demo_sub,
    pending_login,
    query,
    set_cookies,
)

pytestmark = pytest.mark.integration

STRICT = "strict"  # the provider that speaks RFC 9207
CLIENT_SECRET = "demo-client-secret"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def strict_idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    idp = start_oidc_provider(Path(tmp_path_factory.mktemp("oidc-rfc9207")), iss_parameter=True)
    try:
        yield idp
    finally:
        idp.stop()


def _settings_for(stack: Stack, port: int, idp: ManagedProcess, **overrides: Any) -> Any:
    url = f"http://127.0.0.1:{port}"
    config_rules = stack.config(url)["rules"]
    for rule in config_rules:
        rule["providers"] = [*rule["providers"], STRICT]
    strict = {
        "type": "oidc",
        "issuer": idp.url,
        "client_ids": [DEV_CLIENT_ID],
        "client_secret": CLIENT_SECRET,
    }
    return make_settings(
        stack,
        url,
        providers={STRICT: strict},
        rules=config_rules,
        rate_limit={"per_ip_per_minute": 0, "per_identity_per_minute": 0},
        **overrides,
    )


@pytest.fixture(scope="module")
def mixup_broker(stack: Stack, strict_idp: ManagedProcess) -> Iterator[LiveBroker]:
    port = free_port()
    with serve(_settings_for(stack, port, strict_idp), stack, port) as live:
        yield live


@pytest.fixture
def web(mixup_broker: LiveBroker) -> Iterator[WebClient]:
    client = WebClient(mixup_broker)
    yield client
    client.http.close()


# --------------------------------------------------------------------------- helpers


def with_param(url: str, name: str, *values: str | None) -> str:
    """The URL with its ``name`` parameter replaced by ``values`` (None: left out)."""
    parts = urlsplit(url)
    params = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != name]
    params += [(name, v) for v in values if v is not None]
    return parts._replace(query=urlencode(params)).geturl()


def with_iss(callback: str, *values: str | None) -> str:
    return with_param(callback, "iss", *values)


def redeem(idp_url: str, callback: str, verifier: str, redirect_uri: str) -> requests.Response:
    """Redeem the callback's code at the provider ourselves (the broker's client)."""
    return requests.post(
        f"{idp_url}/oauth2/token",
        data={
            "grant_type": "authorization_code",
            "code": query(callback)["code"],
            "redirect_uri": redirect_uri,
            "code_verifier": verifier,
        },
        auth=(DEV_CLIENT_ID, CLIENT_SECRET),
        timeout=TIMEOUT,
    )


def authorize(web: WebClient, provider: str, user: str = "alice") -> tuple[str, dict[str, Any]]:
    """Start at the broker, sign in at the provider: (callback URL, the pending login)."""
    url = web.start(provider)
    pending = pending_login(web.broker, query(url)["state"])
    assert pending is not None
    return web.authorize(url, demo_sub(user)), dict(pending)


def assert_code_never_sent(idp_url: str, callback: str, pending: dict[str, Any]) -> None:
    first = redeem(idp_url, callback, pending["code_verifier"], pending["redirect_uri"])
    assert first.status_code == 200, first.text  # nobody had redeemed it
    again = redeem(idp_url, callback, pending["code_verifier"], pending["redirect_uri"])
    assert again.status_code == 400  # and the provider does refuse a second redemption
    assert again.json()["error"] == "invalid_grant"


# --------------------------------------------------------------------------- RFC 9207


def test_the_strict_stand_in_speaks_rfc9207(
    web: WebClient, stack: Stack, strict_idp: ManagedProcess
) -> None:
    strict = requests.get(f"{strict_idp.url}/.well-known/openid-configuration", timeout=TIMEOUT)
    assert strict.json()["authorization_response_iss_parameter_supported"] is True
    callback, _ = authorize(web, STRICT)
    assert query(callback)["iss"] == strict_idp.url
    denied = web.deny(web.start(STRICT))
    assert query(denied)["iss"] == strict_idp.url
    # The stack's provider neither advertises nor sends it.
    plain = requests.get(f"{stack.oidc.url}/.well-known/openid-configuration", timeout=TIMEOUT)
    assert "authorization_response_iss_parameter_supported" not in plain.json()
    callback, _ = authorize(web, DEV_PROVIDER)
    assert "iss" not in query(callback)


@pytest.mark.parametrize("provider", [STRICT, DEV_PROVIDER])
def test_the_right_iss_signs_in(web: WebClient, stack: Stack, provider: str) -> None:
    callback, _ = authorize(web, provider)
    if provider == DEV_PROVIDER:
        callback = with_iss(callback, stack.oidc.url)  # optional there, but checked if sent
    r = web.get(callback)
    assert r.status_code == 303, r.text
    assert web.get("/v1/session").json()["provider"] == provider


# (name, how to rewrite the strict provider's iss; "{idp}"/"{other}" are filled in)
WRONG_ISS = [
    ("missing", [None]),
    ("another provider", ["{other}"]),
    ("trailing slash", ["{idp}/"]),
    ("upper-case scheme", ["HTTP://{idp_host}"]),
    ("localhost for 127.0.0.1", ["http://localhost:{idp_port}"]),
    ("empty", [""]),
    ("attacker", ["https://evil.example"]),
    ("padded", [" {idp}"]),
    ("right then wrong", ["{idp}", "{other}"]),
    ("right twice", ["{idp}", "{idp}"]),
]


def _fill(value: str | None, idp: ManagedProcess, other: str) -> str | None:
    if value is None:
        return None
    host = urlsplit(idp.url).netloc
    return value.format(idp=idp.url, other=other, idp_host=host, idp_port=idp.port)


@pytest.mark.parametrize(("name", "values"), WRONG_ISS, ids=[row[0] for row in WRONG_ISS])
def test_a_wrong_or_missing_iss_is_refused_and_the_code_never_sent(
    web: WebClient, stack: Stack, strict_idp: ManagedProcess, name: str, values: list[str | None]
) -> None:
    callback, pending = authorize(web, STRICT)
    bad = with_iss(callback, *(_fill(v, strict_idp, stack.oidc.url) for v in values))
    r = web.get(bad)
    assert_html_error(r, 400, "invalid_request")
    assert "iss" in r.text
    assert "evil.example" not in r.text  # the value is never echoed
    assert web.session_id() is None
    assert_code_never_sent(strict_idp.url, callback, pending)
    # The state is used up: the genuine response cannot be replayed after the attempt.
    assert_html_error(web.get(callback), 400, "invalid_request")


@pytest.mark.parametrize("iss", ["{idp}", "https://evil.example", ""])
def test_a_provider_that_does_not_advertise_iss_still_has_it_checked(
    web: WebClient, stack: Stack, strict_idp: ManagedProcess, iss: str
) -> None:
    """The stack's provider sends no iss; one that names anyone else is a mix-up."""
    callback, pending = authorize(web, DEV_PROVIDER)
    r = web.get(with_iss(callback, _fill(iss, strict_idp, stack.oidc.url)))
    assert_html_error(r, 400, "invalid_request")
    assert "another provider" in r.text
    assert web.session_id() is None
    assert_code_never_sent(stack.oidc.url, callback, pending)


@pytest.mark.parametrize(
    ("iss", "status"),
    [("{idp}", 403), ("{other}", 400), (None, 400), ("", 400)],
)
def test_error_responses_are_checked_for_iss_too(
    web: WebClient, stack: Stack, strict_idp: ManagedProcess, iss: str | None, status: int
) -> None:
    start = web.start(STRICT)
    denied = web.deny(start)
    # RFC 6749 4.1.2.1 returns the state with an error; the mock leaves it out.
    url = with_param(denied, "state", query(start)["state"])
    url = with_iss(url, _fill(iss, strict_idp, stack.oidc.url))
    r = web.get(with_param(url, "error_description", "Call 555-0100"))
    if status == 403:
        assert_html_error(r, 403, "access_denied")
    else:
        assert_html_error(r, 400, "invalid_request")
        assert "555-0100" not in r.text  # a mixed-up response's text is not shown as ours
    assert pending_login(web.broker, query(start)["state"]) is None  # used up either way


# --------------------------------------------------------------------------- LWA, Facebook


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


TOKEN_PATHS = {"amazon": "/auth/o2/token", "facebook": "/oauth/access_token"}


@pytest.mark.parametrize("iss", ["https://www.amazon.com", "https://www.facebook.com", ""])
@pytest.mark.parametrize("provider", ["amazon", "facebook"])
def test_social_providers_refuse_any_iss(
    social_broker: LiveBroker, social: SocialServers, provider: str, iss: str
) -> None:
    """Login with Amazon and Facebook have no issuer identifier and send no iss: a
    response carrying one came from elsewhere, and their token endpoint never hears of
    it."""
    web = WebClient(social_broker)
    server = social.amazon if provider == "amazon" else social.facebook
    authorize_url = web.start(provider)
    r = web.http.get(f"{authorize_url}&user=alice", allow_redirects=False, timeout=TIMEOUT)
    assert r.status_code == 302, r.text
    before, exchanges = server.hits(), server.hits(TOKEN_PATHS[provider])
    refused = web.get(with_iss(r.headers["Location"], iss))
    assert_html_error(refused, 400, "invalid_request")
    assert "never sends one" in refused.text
    assert server.hits() == before  # no token request, nor any other
    assert web.session_id() is None
    # Without iss, as they answer, the same flow signs in (and the counter sees it).
    authorize_url = web.start(provider)
    r = web.http.get(f"{authorize_url}&user=alice", allow_redirects=False, timeout=TIMEOUT)
    assert web.get(r.headers["Location"]).status_code == 303
    assert server.hits(TOKEN_PATHS[provider]) > exchanges


# --------------------------------------------------------------------------- login binding


def binding_cookie(web: WebClient) -> str | None:
    return web.http.cookies.get(f"{web.cookie_name}_login")


@pytest.mark.parametrize("opened_by", ["attacker", "victim"])
def test_a_planted_binding_never_binds_the_victims_login(
    mixup_broker: LiveBroker, opened_by: str
) -> None:
    """Cookie tossing: the attacker plants their own binding value in the victim's
    browser, the victim signs in, and the victim's callback URL leaks (a log, a
    Referer). Opened in the attacker's browser it must sign nobody in."""
    attacker, victim = WebClient(mixup_broker), WebClient(mixup_broker)
    attacker.start()
    planted = binding_cookie(attacker)
    assert planted is not None
    victim.http.cookies.set(f"{victim.cookie_name}_login", planted, domain="127.0.0.1", path="/")

    url = victim.start()
    pending = pending_login(mixup_broker, query(url)["state"])
    assert pending is not None
    assert pending["browser"] != planted  # minted for this login, not adopted
    fresh = binding_cookie(victim)
    assert fresh is not None
    assert fresh.split(".")[0] == pending["browser"]
    callback = victim.authorize(url, demo_sub("alice"))

    if opened_by == "attacker":
        r = attacker.get(callback)
        assert_html_error(r, 400, "invalid_request")
        assert "another browser" in r.text
        assert attacker.session_id() is None
    else:
        assert victim.get(callback).status_code == 303
        assert victim.get("/v1/session").json()["subject"] == demo_sub("alice")


@pytest.mark.parametrize(
    "planted",
    ["", ".", "." * 200, "x", "A" * 42, "A" * 44, "A" * 43 + "!", "<script>", "%00" * 10],
)
def test_malformed_binding_cookies_are_dropped(web: WebClient, planted: str) -> None:
    web.http.cookies.set(f"{web.cookie_name}_login", planted, domain="127.0.0.1", path="/")
    url = web.start()
    pending = pending_login(web.broker, query(url)["state"])
    assert pending is not None
    assert binding_cookie(web) == pending["browser"]  # only the fresh value is kept
    assert web.get(web.authorize(url, demo_sub("bob"))).status_code == 303


def test_sign_ins_started_in_several_tabs_all_complete(web: WebClient) -> None:
    urls = [web.start() for _ in range(MAX_PENDING_LOGINS)]
    bindings = [pending_login(web.broker, query(u)["state"]) for u in urls]
    cookie = binding_cookie(web)
    assert cookie is not None
    assert cookie.split(".") == [b["browser"] for b in reversed(bindings) if b]
    assert len(set(cookie.split("."))) == MAX_PENDING_LOGINS  # a fresh value per start
    # Completed in any order, each against its own binding, which is then forgotten.
    for url in (urls[0], urls[-1], *urls[1:-1]):
        pending = pending_login(web.broker, query(url)["state"])
        assert pending is not None
        assert web.get(web.authorize(url, demo_sub("bob"))).status_code == 303
        assert pending["browser"] not in (binding_cookie(web) or "")
    assert binding_cookie(web) is None  # the last one cleared the cookie


def test_the_oldest_of_too_many_sign_ins_falls_out(web: WebClient) -> None:
    urls = [web.start() for _ in range(MAX_PENDING_LOGINS + 1)]
    r = web.get(web.authorize(urls[0], demo_sub("bob")))
    assert_html_error(r, 400, "invalid_request")
    assert "another browser" in r.text
    assert web.get(web.authorize(urls[1], demo_sub("bob"))).status_code == 303


# --------------------------------------------------------------------------- __Host- names


def cookie_map(response: requests.Response) -> dict[str, tuple[str, list[str]]]:
    """Set-Cookie headers as name -> (value, lower-case attributes)."""
    found: dict[str, tuple[str, list[str]]] = {}
    for header in set_cookies(response):
        first, *attributes = [part.strip() for part in header.split(";")]
        name, _, value = first.partition("=")
        found[name] = (value, [a.lower() for a in attributes])
    return found


def assert_host_cookie(attributes: list[str]) -> None:
    assert "secure" in attributes
    assert "path=/" in attributes
    assert not any(a.startswith("domain") for a in attributes)
    assert "httponly" in attributes


@pytest.mark.parametrize(
    ("configured", "sent"),
    [
        ("broker_session", "__Host-broker_session"),
        ("__Host-broker_session", "__Host-broker_session"),
        ("__Secure-sess", "__Host-sess"),
    ],
)
def test_secure_cookies_go_out_under_host_names(
    stack: Stack, strict_idp: ManagedProcess, configured: str, sent: str
) -> None:
    """Plain http here, so the test carries the Secure cookies back by hand (a browser
    would only over https)."""
    port = free_port()
    web_settings = {"cookie_secure": True, "session_cookie": configured}
    settings = _settings_for(stack, port, strict_idp, web=web_settings)
    with serve(settings, stack, port) as broker:
        http = requests.Session()
        start = http.get(f"{broker.url}/login/{STRICT}", allow_redirects=False, timeout=TIMEOUT)
        cookies = cookie_map(start)
        assert set(cookies) == {f"{sent}_login"}
        binding, attributes = cookies[f"{sent}_login"]
        assert_host_cookie(attributes)

        signed_in = http.post(
            start.headers["Location"], data={"sub": "alice"}, allow_redirects=False, timeout=15
        )
        callback = http.get(
            signed_in.headers["Location"],
            cookies={f"{sent}_login": binding},
            allow_redirects=False,
            timeout=TIMEOUT,
        )
        assert callback.status_code == 303, callback.text
        cookies = cookie_map(callback)
        session_id, attributes = cookies[sent]
        assert_host_cookie(attributes)
        # The finished sign-in's binding is cleared, under its __Host- name too.
        cleared, attributes = cookies[f"{sent}_login"]
        assert cleared == ""
        assert_host_cookie(attributes)
        assert not any(name.startswith("broker_session") for name in cookies)

        session_url = f"{broker.url}/v1/session"
        ok = requests.get(session_url, cookies={sent: session_id}, timeout=TIMEOUT)
        assert ok.status_code == 200
        # Only the __Host- name is read: the same value under a name any subdomain
        # could set is nobody's session.
        for other in {configured, sent.removeprefix("__Host-")} - {sent}:
            r = requests.get(session_url, cookies={other: session_id}, timeout=TIMEOUT)
            assert r.status_code == 401
        http.close()
