"""Pages a browser may ask for outside any sign-in: the favicon and the not-found page.

Promises: ``/favicon.ico`` is a static SVG served with a day of public caching (it
holds nothing personal, and browsers ask for it on every page); a 404 is an HTML page
for a browser (``Accept`` prefers ``text/html``) and the broker's JSON error for
everyone else, and ``/v1/...`` paths are always JSON. Neither touches Redis.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, make_response, render_template, request, send_from_directory
from werkzeug.exceptions import HTTPException, NotFound

from broker.web import errors as json_errors

blueprint = Blueprint("pages", __name__)

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
            message="There is no page at this address",
            sign_in_again=False,
            provider=None,
            retry_after=None,
        ),
        404,
    )
    response.headers["Cache-Control"] = "no-store"
    return response
