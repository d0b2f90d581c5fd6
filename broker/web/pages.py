"""Pages a browser may ask for outside any sign-in: the favicon and the not-found page;
and what every page's templates share (the ``breakable`` filter).

Promises: ``/favicon.ico`` is a static SVG served with a day of public caching (it
holds nothing personal, and browsers ask for it on every page); a 404 is an HTML page
for a browser (``Accept`` prefers ``text/html``) and the broker's JSON error for
everyone else, and ``/v1/...`` paths are always JSON. Neither touches Redis.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, make_response, render_template, request, send_from_directory
from markupsafe import Markup, escape
from werkzeug.exceptions import HTTPException, NotFound

from broker.web import errors as json_errors

blueprint = Blueprint("pages", __name__)


# What an error page says first, by the error's code; by its status for the rest.
_HEADINGS = {
    "unknown_provider": "Unknown sign-in provider",
    "invalid_token": "The sign-in could not be verified",
    "expired_token": "Your sign-in has expired",
    "unauthenticated": "Please sign in",
    "no_matching_rule": "No AWS access for this account",
    "role_not_allowed": "That role is not yours to use",
    "access_denied": "Not allowed",
    "not_found": "Page not found",
    "rate_limited": "Too many requests",
    "upstream_error": "The sign-in provider or AWS failed",
    "upstream_throttled": "Busy for a moment",
    "dependency_unavailable": "Temporarily unavailable",
}


def error_heading(status: int, code: str) -> str:
    """The first thing an error page says."""
    if code in _HEADINGS:
        return _HEADINGS[code]
    return "Something went wrong" if status >= 500 else "The request could not be completed"


_COLON_BREAK = Markup(":<wbr>")
_SLASH_BREAK = Markup("/<wbr>")


@blueprint.app_template_filter("breakable")
def breakable(text: str) -> Markup:
    """``text`` (an ARN, a URL) that may wrap after each ``:`` and ``/`` on a narrow
    screen, never in the middle of a name: escaped first, then ``<wbr>`` added."""
    # Markup.replace escapes what it is given unless it is Markup already.
    return escape(text).replace(":", _COLON_BREAK).replace("/", _SLASH_BREAK)


STATIC = Path(__file__).resolve().parents[1] / "static"
FAVICON_MAX_AGE_SECONDS = 86400


@blueprint.get("/favicon.ico")
def favicon() -> Response:
    response = send_from_directory(
        STATIC, "favicon.svg", mimetype="image/svg+xml", max_age=FAVICON_MAX_AGE_SECONDS
    )
    response.cache_control.public = True
    return response


def wants_html() -> bool:
    """A browser navigating: HTML ranked above JSON, and not an API path."""
    if request.path.startswith("/v1/"):
        return False
    # JSON listed first: a client that takes anything (curl, SDKs: */*) gets JSON.
    return request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html"


@blueprint.app_errorhandler(NotFound)
def not_found(exc: HTTPException) -> Response:
    if not wants_html():
        return json_errors.http_error(exc)
    response = make_response(
        render_template(
            "error.html",
            ws=None,
            status=404,
            code="not_found",
            heading=error_heading(404, "not_found"),
            message="There is no page at this address",
            sign_in_again=False,
            provider=None,
            retry_after=None,
        ),
        404,
    )
    response.headers["Cache-Control"] = "no-store"
    return response
