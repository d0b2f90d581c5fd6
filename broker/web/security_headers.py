"""Security headers on every response; a strict Content-Security-Policy on HTML.

The pages are server-rendered with no inline script or style, so the policy can be
``'self'`` for everything: an injected ``<script>`` (were autoescaping ever bypassed)
would not run, and no other site can frame a page to trick a click (``frame-ancestors
'none'`` plus ``X-Frame-Options`` for old browsers).

``form-action`` governs where forms may submit, and Chromium also applies it to the
redirects that follow a submission. The sign-in links are plain links and GET
redirects, which ``form-action`` does not govern, so ``'self'`` is enough for them.
The console sign-in form, however, answers with a redirect to the AWS federation
endpoint, so that origin is allowed as a form target too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

from flask import Flask, Response, request
from werkzeug.datastructures import Headers
from werkzeug.wrappers import Response as WerkzeugResponse

from broker.services import EXTENSION_KEY
from broker.settings import Settings

if TYPE_CHECKING:
    # Not at run time: broker.server imports this module in the gunicorn master, which
    # must not import botocore, urllib3 or redis before the gevent worker has patched
    # the standard library (see broker.server).
    from broker.services import Services

R = TypeVar("R", bound=WerkzeugResponse)

# The AWS federation endpoints per partition (the console part redirects there).
AWS_SIGNIN_ORIGINS = (
    "https://signin.aws.amazon.com",
    "https://*.signin.aws.amazon.com",  # regional endpoints, e.g. eu-west-1.signin...
    "https://signin.amazonaws-us-gov.com",
    "https://signin.amazonaws.cn",
)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def content_security_policy(settings: Settings) -> str:
    form_targets = ["'self'", *AWS_SIGNIN_ORIGINS]
    if settings.console.federation_url:
        form_targets.append(_origin(settings.console.federation_url))
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self'",
            "connect-src 'self'",
            "base-uri 'none'",
            "object-src 'none'",
            "frame-ancestors 'none'",
            f"form-action {' '.join(dict.fromkeys(form_targets))}",
        ]
    )


# For JSON and everything else: nothing may load or frame it.
NON_HTML_POLICY = "default-src 'none'; frame-ancestors 'none'"


def add_missing(headers: Headers, defaults: Iterable[tuple[str, str]]) -> None:
    """``setdefault`` for several headers in one pass. werkzeug scans every header per
    ``set``/``setdefault``; on the hot path those scans cost more than the broker's
    own work, so the names present are read once."""
    present = {name.lower() for name in headers.keys()}  # noqa: SIM118 - Headers.keys()
    headers.extend([(name, value) for name, value in defaults if name.lower() not in present])


# What no_store sets; the credentials exchange sends the same pair.
NO_STORE = (("Cache-Control", "no-store"), ("Pragma", "no-cache"))


def no_store(response: R, *, no_referrer: bool = False) -> R:
    """Forbid every cache (browser history, proxy, CDN) to keep a copy: for responses
    that carry credentials, sign-in URLs or one person's pages."""
    headers = response.headers
    present = {name.lower(): value for name, value in headers.items()}
    for name, value in NO_STORE:
        if present.get(name.lower()) != value:
            headers[name] = value
    if no_referrer and present.get("referrer-policy") != "no-referrer":
        headers["Referrer-Policy"] = "no-referrer"
    return response


# Pages carry session-bound URLs and the provider's redirect carries codes: never tell
# the next site where the browser came from (Referrer-Policy).
_COMMON = (
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Permissions-Policy", "camera=(), microphone=(), geolocation=()"),
)
_HSTS = (("Strict-Transport-Security", "max-age=31536000"),)


def public_https(settings: Settings) -> bool:
    """Whether the broker's public URL is https: every answer then carries HSTS, as does
    any answer to a request that came over TLS."""
    return settings.server.public_url.startswith("https://")


def json_headers(*, secure: bool) -> tuple[tuple[str, str], ...]:
    """What every non-HTML response carries (HSTS too when ``secure``: the public URL
    is https or the request came over TLS). The credentials exchange
    (``broker.web.exchange``) sends exactly these, and the no-store pair."""
    return (("Content-Security-Policy", NON_HTML_POLICY), *_COMMON, *(_HSTS if secure else ()))


def install(app: Flask) -> None:
    """Add the headers to every response of ``app`` (after its services are set)."""

    services: Services = app.extensions[EXTENSION_KEY]
    settings = services.settings
    html_policy = content_security_policy(settings)
    https = public_https(settings)

    html_headers = (("Content-Security-Policy", html_policy), *_COMMON)
    other_headers = json_headers(secure=False)

    @app.after_request
    def _security_headers(response: Response) -> Response:
        add_missing(
            response.headers, html_headers if response.mimetype == "text/html" else other_headers
        )
        if https or request.is_secure:
            add_missing(response.headers, _HSTS)
        return response
