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
from broker.issuer import DISCOVERY_PATH, JWKS_PATH, Issuer, Publication
from broker.services import current_services

blueprint = Blueprint("issuer", __name__)


def _issuer() -> tuple[Issuer, Publication]:
    """The issuer and what it publishes now (one read of the key ring); 404 when off."""
    services = current_services()
    issuer = services.issuer
    if issuer is None or not issuer_in_use(services.settings):
        raise NotFound("not found")
    return issuer, issuer.publication()


def _cacheable(response: Response, publication: Publication) -> Response:
    seconds = publication.cache_seconds
    response.headers["Cache-Control"] = f"public, max-age={seconds}" if seconds else "no-cache"
    return response


@blueprint.get(DISCOVERY_PATH)
def discovery() -> Response:
    issuer, publication = _issuer()
    return _cacheable(jsonify(issuer.discovery(publication)), publication)


@blueprint.get(JWKS_PATH)
def jwks() -> Response:
    issuer, publication = _issuer()
    response = jsonify(issuer.jwks(publication))
    response.mimetype = "application/jwk-set+json"
    return _cacheable(response, publication)
