"""Log a demo user in at the local OIDC provider, over HTTP, without a browser.

This is the authorization code flow a mobile app runs (RFC 6749 4.1, OpenID Connect Core
3.1, optionally PKCE S256 as RFC 8252 asks of native apps), with the person's part (the
login page) replaced by the local provider's one-click form: ``POST sub=<subject>`` to the
authorization endpoint. Only the dev stack's provider (``broker.devstack.oidc_server``)
has that form, so this is a dev/test tool, not a client for real providers.

The ID token comes back exactly as the provider issued it: verifying it is the broker's
job (and the point of the tests that use this).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests

__all__ = [
    "OidcLoginError",
    "ProviderMetadata",
    "TokenSet",
    "authorize",
    "discover",
    "exchange_code",
    "login",
    "new_code_verifier",
    "s256_challenge",
]


class OidcLoginError(RuntimeError):
    """A step of the login failed; the message says which and what the provider said."""


@dataclass(frozen=True)
class TokenSet:
    id_token: str
    access_token: str
    refresh_token: str | None
    expires_in: int | None


@dataclass(frozen=True)
class ProviderMetadata:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str


def new_code_verifier() -> str:
    """A PKCE code verifier: 43 characters from the unreserved set (256 random bits)."""
    return secrets.token_urlsafe(32)


def s256_challenge(code_verifier: str) -> str:
    """``BASE64URL(SHA256(verifier))`` without padding (RFC 7636 4.2)."""
    digest = hashlib.sha256(code_verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _session() -> requests.Session:
    http = requests.Session()
    # The provider is on loopback: an HTTP(S)_PROXY from the environment must not
    # intercept the flow (nor see the code and tokens).
    http.trust_env = False
    return http


def _describe(response: requests.Response) -> str:
    """The provider's OAuth error, if it sent one, else the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:300]!r}"
    if isinstance(body, dict) and "error" in body:
        description = body.get("error_description")
        return f"HTTP {response.status_code}: {body['error']}" + (
            f" ({description})" if description else ""
        )
    return f"HTTP {response.status_code}: {str(body)[:300]}"


def discover(
    issuer: str, *, session: requests.Session | None = None, timeout: float = 5.0
) -> ProviderMetadata:
    """Fetch and check ``{issuer}/.well-known/openid-configuration``."""
    issuer = issuer.rstrip("/")
    http = session or _session()
    url = f"{issuer}/.well-known/openid-configuration"
    try:
        response = http.get(url, timeout=timeout)
    except requests.RequestException as exc:
        raise OidcLoginError(f"discovery: cannot reach {url}: {exc}") from exc
    if response.status_code != 200:
        raise OidcLoginError(f"discovery: {url} answered {_describe(response)}")
    try:
        doc: Any = response.json()
    except ValueError as exc:
        raise OidcLoginError(f"discovery: {url} did not return JSON") from exc
    if not isinstance(doc, dict):
        raise OidcLoginError(f"discovery: {url} did not return a JSON object")
    # OpenID Connect Discovery 4.3: the issuer in the document must be the one we asked.
    if doc.get("issuer") != issuer:
        raise OidcLoginError(f"discovery: document issuer {doc.get('issuer')!r} is not {issuer!r}")
    fields = ("authorization_endpoint", "token_endpoint", "jwks_uri")
    missing = [name for name in fields if not isinstance(doc.get(name), str)]
    if missing:
        raise OidcLoginError(f"discovery: document lacks {', '.join(missing)}")
    return ProviderMetadata(
        issuer=issuer,
        authorization_endpoint=doc["authorization_endpoint"],
        token_endpoint=doc["token_endpoint"],
        jwks_uri=doc["jwks_uri"],
    )


def authorize(
    metadata: ProviderMetadata,
    *,
    subject: str,
    client_id: str,
    redirect_uri: str,
    scope: str,
    state: str,
    nonce: str | None = None,
    code_challenge: str | None = None,
    code_challenge_method: str = "S256",
    session: requests.Session | None = None,
    timeout: float = 5.0,
) -> str:
    """The front-channel half: sign ``subject`` in and return the authorization code.

    Does not follow the redirect (there is no app listening at ``redirect_uri``); reads
    the code from its ``Location`` and checks it goes to ``redirect_uri`` with our state.
    """
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": scope,
        "state": state,
    }
    if nonce is not None:
        params["nonce"] = nonce
    if code_challenge is not None:
        params["code_challenge"] = code_challenge
        params["code_challenge_method"] = code_challenge_method
    http = session or _session()
    try:
        response = http.post(
            metadata.authorization_endpoint,
            params=params,
            data={"sub": subject},
            allow_redirects=False,
            timeout=timeout,
        )
    except requests.RequestException as exc:
        raise OidcLoginError(f"authorization: request failed: {exc}") from exc
    location = response.headers.get("Location")
    if response.status_code not in (302, 303) or not location:
        raise OidcLoginError(
            f"authorization: expected a redirect to {redirect_uri}, got {_describe(response)}"
        )
    target = urlsplit(location)
    expected = urlsplit(redirect_uri)
    if (target.scheme, target.netloc, target.path) != (
        expected.scheme,
        expected.netloc,
        expected.path,
    ):
        raise OidcLoginError(f"authorization: redirected to {location!r}, not {redirect_uri!r}")
    query = {key: values[0] for key, values in parse_qs(target.query).items()}
    if "error" in query:
        description = query.get("error_description")
        raise OidcLoginError(
            f"authorization: provider refused: {query['error']}"
            + (f" ({description})" if description else "")
        )
    # The state ties the redirect to this request (RFC 6749 10.12).
    if query.get("state") != state:
        raise OidcLoginError("authorization: the redirect carries a different state")
    code = query.get("code")
    if not code:
        raise OidcLoginError("authorization: the redirect carries no code")
    return code


def exchange_code(
    metadata: ProviderMetadata,
    *,
    code: str,
    client_id: str,
    redirect_uri: str,
    code_verifier: str | None = None,
    client_secret: str | None = None,
    session: requests.Session | None = None,
    timeout: float = 5.0,
) -> TokenSet:
    """The back-channel half: redeem the code at the token endpoint.

    Without ``client_secret`` the client authenticates as a public client (``none``:
    ``client_id`` in the body), as a mobile app does; with one, ``client_secret_basic``.
    """
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
    }
    auth: tuple[str, str] | None = None
    if client_secret is None:
        form["client_id"] = client_id
    else:
        auth = (client_id, client_secret)
    if code_verifier is not None:
        form["code_verifier"] = code_verifier
    http = session or _session()
    try:
        response = http.post(
            metadata.token_endpoint,
            data=form,
            auth=auth,
            headers={"Accept": "application/json"},
            allow_redirects=False,
            timeout=timeout,
        )
    except requests.RequestException as exc:
        raise OidcLoginError(f"token: request failed: {exc}") from exc
    if response.status_code != 200:
        raise OidcLoginError(f"token: provider refused the code: {_describe(response)}")
    try:
        body: Any = response.json()
    except ValueError as exc:
        raise OidcLoginError("token: response is not JSON") from exc
    if not isinstance(body, dict):
        raise OidcLoginError("token: response is not a JSON object")
    id_token = body.get("id_token")
    access_token = body.get("access_token")
    if not isinstance(id_token, str) or not id_token:
        raise OidcLoginError("token: no id_token in the response (is 'openid' in the scope?)")
    if not isinstance(access_token, str):
        raise OidcLoginError("token: no access_token in the response")
    refresh_token = body.get("refresh_token")
    expires_in = body.get("expires_in")
    return TokenSet(
        id_token=id_token,
        access_token=access_token,
        refresh_token=refresh_token if isinstance(refresh_token, str) else None,
        expires_in=expires_in if isinstance(expires_in, int) else None,
    )


def login(
    issuer: str,
    *,
    subject: str,
    client_id: str,
    redirect_uri: str = "http://127.0.0.1/callback",
    scope: str = "openid email profile",
    nonce: str | None = None,
    code_verifier: str | None = None,
    client_secret: str | None = None,
    timeout: float = 5.0,
) -> TokenSet:
    """Run the whole authorization code flow for ``subject``; returns the tokens.

    ``nonce`` is sent when given (the ID token then carries it). With ``code_verifier``
    the request carries its S256 challenge and the token request the verifier.
    Raises :class:`OidcLoginError` naming the step that failed.
    """
    with _session() as http:
        metadata = discover(issuer, session=http, timeout=timeout)
        code = authorize(
            metadata,
            subject=subject,
            client_id=client_id,
            redirect_uri=redirect_uri,
            scope=scope,
            state=secrets.token_urlsafe(24),
            nonce=nonce,
            code_challenge=s256_challenge(code_verifier) if code_verifier is not None else None,
            session=http,
            timeout=timeout,
        )
        return exchange_code(
            metadata,
            code=code,
            client_id=client_id,
            redirect_uri=redirect_uri,
            code_verifier=code_verifier,
            client_secret=client_secret,
            session=http,
            timeout=timeout,
        )
