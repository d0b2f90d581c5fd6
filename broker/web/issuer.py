"""What IAM fetches to trust the broker's tokens: the discovery document and the JWKS.

Served only when some rule sends STS the broker's token (``sts_token = "broker"``) or
guests are on:
otherwise the broker is no issuer, and these paths are 404 like any unknown one. The
JWKS may be cached by verifiers for no longer than the time until the next key signs
(``Issuer.cache_seconds``), so a cached copy always knows the signing key.
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from broker.errors import NotFound
from broker.iam_setup import issuer_in_use
from broker.issuer import DISCOVERY_PATH, JWKS_PATH, Issuer
from broker.services import current_services

blueprint = Blueprint("issuer", __name__)


def _issuer() -> tuple[Issuer, int]:
    """The issuer and how long verifiers may cache what it publishes; 404 when off."""
    services = current_services()
    issuer = services.issuer
    if issuer is None or not issuer_in_use(services.settings):
        raise NotFound("not found")
    return issuer, issuer.cache_seconds()


def _cacheable(response: Response, seconds: int) -> Response:
    response.headers["Cache-Control"] = f"public, max-age={seconds}" if seconds else "no-cache"
    return response


@blueprint.get(DISCOVERY_PATH)
def discovery() -> Response:
    issuer, seconds = _issuer()
    return _cacheable(jsonify(issuer.discovery()), seconds)


@blueprint.get(JWKS_PATH)
def jwks() -> Response:
    issuer, seconds = _issuer()
    response = jsonify(issuer.jwks())
    response.mimetype = "application/jwk-set+json"
    return _cacheable(response, seconds)
