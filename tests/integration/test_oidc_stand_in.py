"""The local OIDC provider (oidc-provider-mock behind ``broker.devstack.oidc_server``) and
the headless login (``broker.devstack.oidc_login``): real processes, real sockets, real
RS256 signatures."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests

from broker.devstack.oidc_login import (
    OidcLoginError,
    ProviderMetadata,
    TokenSet,
    authorize,
    discover,
    exchange_code,
    login,
    new_code_verifier,
    s256_challenge,
)
from broker.devstack.oidc_server import DEMO_USERS, start_oidc_provider, validate_users
from broker.devstack.processes import ManagedProcess

pytestmark = pytest.mark.integration

CLIENT_ID = "mobile-app"
REDIRECT_URI = "http://127.0.0.1/callback"
TIMEOUT = 5.0


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    process = start_oidc_provider(tmp_path_factory.mktemp("oidc"))
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def metadata(provider: ManagedProcess) -> ProviderMetadata:
    return discover(provider.url)


def http() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    return session


def demo(sub: str) -> dict[str, Any]:
    return dict(next(u for u in DEMO_USERS if u["sub"] == sub))


def verify(provider: ManagedProcess, id_token: str, *, audience: str = CLIENT_ID) -> dict[str, Any]:
    """Verify like a relying party: key from the published JWKS by ``kid``, RS256 only."""
    jwks = jwt.PyJWKClient(f"{provider.url}/jwks", cache_keys=False, timeout=TIMEOUT)
    key = jwks.get_signing_key_from_jwt(id_token)
    claims: dict[str, Any] = jwt.decode(
        id_token,
        key,
        algorithms=["RS256"],
        audience=audience,
        issuer=provider.url,
        options={"require": ["iss", "aud", "exp", "iat", "sub"]},
    )
    return claims


def code_for(
    metadata: ProviderMetadata, *, subject: str = "alice", code_challenge: str | None = None
) -> str:
    return authorize(
        metadata,
        subject=subject,
        client_id=CLIENT_ID,
        redirect_uri=REDIRECT_URI,
        scope="openid email profile",
        state="state-0123456789",
        code_challenge=code_challenge,
    )


def redeem(metadata: ProviderMetadata, code: str, **kwargs: Any) -> TokenSet:
    return exchange_code(
        metadata,
        code=code,
        client_id=CLIENT_ID,
        redirect_uri=kwargs.pop("redirect_uri", REDIRECT_URI),
        **kwargs,
    )


# -- tokens and claims ----------------------------------------------------------------


def test_login_returns_an_rs256_id_token_that_verifies_against_the_jwks(
    provider: ManagedProcess,
) -> None:
    tokens = login(provider.url, subject="alice", client_id=CLIENT_ID, nonce="n-0123456789")

    header = jwt.get_unverified_header(tokens.id_token)
    assert header["alg"] == "RS256"
    published = http().get(f"{provider.url}/jwks", timeout=TIMEOUT).json()["keys"]
    assert header["kid"] in {k["kid"] for k in published}
    # Only public key material is published.
    assert all(set(k) <= {"kty", "kid", "n", "e", "use", "alg"} for k in published)

    claims = verify(provider, tokens.id_token)
    assert claims["iss"] == provider.url
    # authlib sends aud as a one-element list; PyJWT (and OIDC Core) accept both forms.
    assert claims["aud"] in (CLIENT_ID, [CLIENT_ID])
    assert claims["sub"] == "alice"
    assert claims["nonce"] == "n-0123456789"
    assert claims["email"] == "alice@example.com"
    assert claims["email_verified"] is True
    assert claims["amr"] == ["pwd", "mfa"]
    assert claims["groups"] == ["admins"]
    assert 0 < claims["exp"] - claims["iat"] <= 3600

    assert tokens.access_token
    assert tokens.refresh_token
    assert tokens.expires_in == 3600


def test_a_token_for_another_client_or_signed_elsewhere_does_not_verify(
    provider: ManagedProcess,
) -> None:
    tokens = login(provider.url, subject="alice", client_id=CLIENT_ID)
    with pytest.raises(jwt.InvalidAudienceError):
        verify(provider, tokens.id_token, audience="some-other-app")
    head, body, signature = tokens.id_token.split(".")
    tampered = f"{head}.{body[:-4]}AAAA.{signature}"
    with pytest.raises(jwt.InvalidTokenError):
        verify(provider, tampered)


@pytest.mark.parametrize("user", DEMO_USERS, ids=[str(u["sub"]) for u in DEMO_USERS])
def test_every_demo_users_claims_reach_the_id_token(
    provider: ManagedProcess, user: dict[str, Any]
) -> None:
    tokens = login(provider.url, subject=user["sub"], client_id=CLIENT_ID)
    claims = verify(provider, tokens.id_token)
    for name, value in user.items():
        assert claims[name] == value, name


def test_demo_users_cover_the_cases_the_rules_need() -> None:
    alice, bob, mallory = demo("alice"), demo("bob"), demo("mallory")
    assert alice["email_verified"] is True
    assert "mfa" in alice["amr"]
    assert "admins" in alice["groups"]
    assert bob["email_verified"] is True
    assert "mfa" not in bob["amr"]
    assert mallory["email_verified"] is False
    assert mallory["email"].endswith("@example.com")


def test_standard_claims_follow_the_scope_custom_claims_always_pass(
    provider: ManagedProcess,
) -> None:
    tokens = login(provider.url, subject="alice", client_id=CLIENT_ID, scope="openid")
    claims = verify(provider, tokens.id_token)
    assert "email" not in claims
    assert "email_verified" not in claims
    assert "name" not in claims
    assert claims["amr"] == ["pwd", "mfa"]
    assert claims["groups"] == ["admins"]


def test_unknown_subject_logs_in_with_an_unverified_email_only(provider: ManagedProcess) -> None:
    """The mock creates unknown subjects on the fly with ``email = sub`` and nothing else:
    no ``email_verified``, no ``amr``, no groups."""
    tokens = login(provider.url, subject="eve@example.com", client_id=CLIENT_ID)
    claims = verify(provider, tokens.id_token)
    assert claims["sub"] == "eve@example.com"
    assert claims["email"] == "eve@example.com"
    assert "email_verified" not in claims
    assert "amr" not in claims
    assert "groups" not in claims


def test_confidential_client_with_a_secret(provider: ManagedProcess) -> None:
    tokens = login(provider.url, subject="bob", client_id=CLIENT_ID, client_secret="any")
    assert verify(provider, tokens.id_token)["sub"] == "bob"


# -- issuer ---------------------------------------------------------------------------


def test_issuer_is_127_0_0_1_whatever_name_the_client_used(provider: ManagedProcess) -> None:
    via_localhost = f"http://localhost:{provider.port}"
    doc = http().get(f"{via_localhost}/.well-known/openid-configuration", timeout=TIMEOUT)
    assert doc.status_code == 200
    assert doc.json()["issuer"] == provider.url
    assert doc.json()["token_endpoint"].startswith(f"{provider.url}/")
    # Discovery says the issuer is 127.0.0.1, so a client configured with localhost
    # stops there instead of accepting tokens whose iss it was not told about.
    with pytest.raises(OidcLoginError, match="discovery: document issuer"):
        login(via_localhost, subject="alice", client_id=CLIENT_ID)


def test_a_foreign_host_header_is_refused(provider: ManagedProcess) -> None:
    r = http().get(
        f"{provider.url}/.well-known/openid-configuration",
        headers={"Host": "attacker.example:80"},
        timeout=TIMEOUT,
    )
    assert r.status_code == 400
    assert "issuer" not in r.text


# -- debugger -------------------------------------------------------------------------

DEBUGGER_PROBE = "?__debugger__=yes&cmd=resource&f=style.css"


def test_the_mock_alone_would_expose_the_werkzeug_debugger() -> None:
    """The control for the next test: the probe does reach the debugger when the mock's
    app is used as shipped."""
    import oidc_provider_mock

    raw = oidc_provider_mock.app().test_client()
    r = raw.get(f"/{DEBUGGER_PROBE}")
    assert r.status_code == 200
    assert r.content_type.startswith("text/css")


@pytest.mark.parametrize("path", ["/", "/jwks", "/no-such-page", "/oauth2/authorize"])
def test_the_debugger_is_not_exposed(provider: ManagedProcess, path: str) -> None:
    r = http().get(f"{provider.url}{path}{DEBUGGER_PROBE}", timeout=TIMEOUT)
    assert not r.headers.get("Content-Type", "").startswith("text/css")
    assert "__debugger__" not in r.text
    assert "Werkzeug Debugger" not in r.text
    assert "Traceback" not in r.text


# -- PKCE and codes -------------------------------------------------------------------


def test_discovery_advertises_pkce_and_public_clients(metadata: ProviderMetadata) -> None:
    doc = http().get(f"{metadata.issuer}/.well-known/openid-configuration", timeout=TIMEOUT)
    assert "S256" in doc.json()["code_challenge_methods_supported"]
    assert "none" in doc.json()["token_endpoint_auth_methods_supported"]


def test_pkce_s256_round_trip(provider: ManagedProcess) -> None:
    verifier = new_code_verifier()
    assert 43 <= len(verifier) <= 128
    tokens = login(provider.url, subject="alice", client_id=CLIENT_ID, code_verifier=verifier)
    assert verify(provider, tokens.id_token)["sub"] == "alice"


def test_pkce_mismatch_is_rejected_by_the_token_endpoint(metadata: ProviderMetadata) -> None:
    right, wrong = new_code_verifier(), new_code_verifier()
    code = code_for(metadata, code_challenge=s256_challenge(right))
    with pytest.raises(OidcLoginError, match=r"invalid_grant \(Code challenge failed"):
        redeem(metadata, code, code_verifier=wrong)
    # The refusal was about the verifier: the right one still redeems the same code.
    assert redeem(metadata, code, code_verifier=right).id_token


def test_pkce_mismatch_is_rejected_for_a_confidential_client_too(
    metadata: ProviderMetadata,
) -> None:
    code = code_for(metadata, code_challenge=s256_challenge(new_code_verifier()))
    with pytest.raises(OidcLoginError, match="invalid_grant"):
        redeem(metadata, code, code_verifier=new_code_verifier(), client_secret="any")


def test_a_challenged_code_needs_its_verifier(metadata: ProviderMetadata) -> None:
    code = code_for(metadata, code_challenge=s256_challenge(new_code_verifier()))
    with pytest.raises(OidcLoginError, match="Missing 'code_verifier'"):
        redeem(metadata, code)


def test_a_verifier_without_a_challenge_is_refused(metadata: ProviderMetadata) -> None:
    code = code_for(metadata)
    with pytest.raises(OidcLoginError, match="no 'code_challenge'"):
        redeem(metadata, code, code_verifier=new_code_verifier())


def test_the_s256_challenge_matches_rfc_7636_appendix_b() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert s256_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_a_code_is_single_use(metadata: ProviderMetadata) -> None:
    code = code_for(metadata)
    assert redeem(metadata, code).id_token
    with pytest.raises(OidcLoginError, match="invalid_grant"):
        redeem(metadata, code)


def test_a_code_is_bound_to_its_redirect_uri(metadata: ProviderMetadata) -> None:
    code = code_for(metadata)
    with pytest.raises(OidcLoginError, match="invalid_grant"):
        redeem(metadata, code, redirect_uri="http://127.0.0.1/elsewhere")


# -- login errors ---------------------------------------------------------------------


def test_login_names_the_failing_step() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # bound, never listening: connection refused
        with pytest.raises(OidcLoginError, match="discovery: cannot reach"):
            login(f"http://127.0.0.1:{closed}", subject="alice", client_id=CLIENT_ID)


def test_without_the_openid_scope_there_is_no_id_token(provider: ManagedProcess) -> None:
    with pytest.raises(OidcLoginError, match="no id_token"):
        login(provider.url, subject="alice", client_id=CLIENT_ID, scope="email")


# -- configuration and process --------------------------------------------------------


@pytest.mark.parametrize(
    ("users", "message"),
    [
        ([{"email": "x@example.com"}], "needs a non-empty string 'sub'"),
        ([{"sub": "a"}, {"sub": "a"}], "listed twice"),
        ([{"sub": "a", "iss": "https://accounts.google.com"}], "reserved JWT claims: iss"),
        ([{"sub": "a", "nonce": "fixed"}], "reserved JWT claims: nonce"),
    ],
)
def test_users_that_could_forge_token_claims_are_refused(
    users: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        validate_users(users)


def test_custom_users_require_nonce_and_a_clean_stop(tmp_path: Path) -> None:
    users = [{"sub": "svc-1", "email": "svc@example.org", "email_verified": True, "tier": 3}]
    process = start_oidc_provider(tmp_path, users=users, require_nonce=True)
    try:
        with pytest.raises(OidcLoginError, match="authorization: provider refused"):
            login(process.url, subject="svc-1", client_id=CLIENT_ID)
        tokens = login(process.url, subject="svc-1", client_id=CLIENT_ID, nonce="n-42")
        claims = verify(process, tokens.id_token)
        assert claims["nonce"] == "n-42"
        assert claims["tier"] == 3
        assert claims["email_verified"] is True
        # The demo users are not there: alice is just an unknown subject here.
        alice = verify(
            process, login(process.url, subject="alice", client_id=CLIENT_ID, nonce="n-43").id_token
        )
        assert "groups" not in alice
    finally:
        process.stop()

    # SIGTERM ends the server loop: exit 0, port closed, nothing left in its group.
    assert process.proc.returncode == 0
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", process.port), 0.5),
    ):
        pass
    with pytest.raises(ProcessLookupError):
        os.killpg(process.proc.pid, 0)
    assert "OIDC provider stopped" in process.log_path.read_text()


def test_keys_are_per_process(provider: ManagedProcess, tmp_path: Path) -> None:
    """Another provider's token does not verify here (each process has its own key)."""
    other = start_oidc_provider(tmp_path)
    try:
        foreign = login(other.url, subject="alice", client_id=CLIENT_ID).id_token
    finally:
        other.stop()
    with pytest.raises(jwt.PyJWKClientError):
        verify(provider, foreign)
    key = jwt.PyJWKClient(f"{provider.url}/jwks", timeout=TIMEOUT).get_signing_keys()[0]
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(foreign, key, algorithms=["RS256"], audience=CLIENT_ID)
