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

from urllib.parse import urlsplit

from flask import Flask, Response, request

from broker.services import EXTENSION_KEY, Services
from broker.settings import Settings

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


def install(app: Flask) -> None:
    """Add the headers to every response of ``app`` (after its services are set)."""
    services: Services = app.extensions[EXTENSION_KEY]
    settings = services.settings
    html_policy = content_security_policy(settings)
    https = settings.server.public_url.startswith("https://")

    @app.after_request
    def _security_headers(response: Response) -> Response:
        headers = response.headers
        is_html = response.mimetype == "text/html"
        headers.setdefault("Content-Security-Policy", html_policy if is_html else NON_HTML_POLICY)
        headers.setdefault("X-Frame-Options", "DENY")
        headers.setdefault("X-Content-Type-Options", "nosniff")
        # Pages carry session-bound URLs and the provider's redirect carries codes:
        # never tell the next site where the browser came from.
        headers.setdefault("Referrer-Policy", "no-referrer")
        headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
        headers.setdefault("Permissions-Policy", "camera=(), microphone=(), geolocation=()")
        if https or request.is_secure:
            headers.setdefault("Strict-Transport-Security", "max-age=31536000")
        return response
