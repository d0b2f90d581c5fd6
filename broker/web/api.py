"""The JSON API for mobile backends and apps: provider token in, credentials out."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from broker.errors import BadRequest, BrokerError, InvalidToken
from broker.guards import bearer_token
from broker.services import Issued, Services, current_services
from broker.web.guards import require_bearer
from broker.web.security_headers import no_store

audit_log = logging.getLogger("broker.audit")

blueprint = Blueprint("api", __name__, url_prefix="/v1")

MAX_TOKEN_CHARS = 16 * 1024
_KIND_NAMES = {str: "a string", int: "a number", dict: "a JSON object"}


# POST /v1/credentials: its fields, and those it cannot do without.
CREDENTIALS_FIELDS: Mapping[str, type] = {
    "provider": str,
    "token": str,
    "role_arn": str,
    "duration_seconds": int,
    "nonce": str,
}
CREDENTIALS_REQUIRED = ("provider", "token")


def json_body(allowed: Mapping[str, type], required: tuple[str, ...]) -> dict[str, Any]:
    """The request's JSON object, checked against a flat schema (``checked_body``)."""
    if not request.is_json:
        raise BadRequest("send a JSON body with Content-Type: application/json")
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if request.content_length is None and len(request.get_data(cache=True)) >= limit:
        # A chunked body has no Content-Length; werkzeug stops reading at the limit,
        # which would otherwise surface as "not JSON" instead of "too large".
        raise RequestEntityTooLarge()
    return checked_body(parse_body(request.get_data(cache=True)), allowed, required)


def parse_body(raw: bytes) -> Any:
    """A request body as JSON (UTF-8, -16 or -32, as ``request.get_json`` reads it);
    None if it is not JSON. Both doors of ``POST /v1/credentials`` read it so."""
    try:
        return json.loads(raw)
    except RecursionError:
        # json gives up on deep nesting with RecursionError, not ValueError.
        raise BadRequest("the JSON body is nested too deeply") from None
    except ValueError:  # not JSON, or not text in any encoding JSON allows
        return None


def checked_body(
    body: Any, allowed: Mapping[str, type], required: tuple[str, ...]
) -> dict[str, Any]:
    """``body`` if it is a JSON object that fits a flat schema. Unknown fields are
    refused so a misspelt ``role_arn`` is an error, not a silently ignored choice."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}")
    for name in required:
        if body.get(name) in (None, ""):
            raise BadRequest(f"{name} is required")
    for name, kind in allowed.items():
        value = body.get(name)
        if value is None:
            continue
        # bool is an int subclass: `"duration_seconds": true` must not mean 1.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise BadRequest(f"{name} must be {_KIND_NAMES.get(kind, kind.__name__)}")
    token = body.get("token")
    if isinstance(token, str) and len(token) > MAX_TOKEN_CHARS:
        raise BadRequest("token is too long")
    return body


def issued_json(issued: Issued) -> dict[str, Any]:
    process = issued.credentials.credential_process()
    return {
        "identity_id": issued.identity.identity_id,
        "provider": issued.identity.provider,
        "role_arn": issued.grant.role_arn,
        "assumed_role_arn": issued.credentials.assumed_role_arn,
        "expiration": process["Expiration"],
        "credentials": process,
    }


@blueprint.before_request
def _per_ip_limit() -> None:
    refused = refused_by_replay()
    if refused is not None:
        raise refused  # already counted by the replay attempt
    current_services().limit_address(request.remote_addr)


# Responses carry credentials: no browser, proxy or CDN may keep a copy.
blueprint.after_request(no_store)


@blueprint.post("/credentials")
def credentials() -> Response:
    """Only what ``broker.web.exchange`` hands on: most requests are answered there,
    before Flask, by the same ``exchange``."""
    body = json_body(CREDENTIALS_FIELDS, required=CREDENTIALS_REQUIRED)
    return jsonify(issued_json(exchange(current_services(), body)))


# Left in the WSGI environ by broker.web.exchange when a replay's rate limit refused.
REFUSED_KEY = "broker.replay_rate_limited"


def refused_by_replay() -> BrokerError | None:
    """Why a replay attempt's rate-limit check refused the request (the limit was
    exceeded, or Redis could not count it), so the normal path answers with exactly
    that error instead of counting the request a second time."""
    refused = request.environ.get(REFUSED_KEY)
    return refused if isinstance(refused, BrokerError) else None


def exchange(services: Services, body: Mapping[str, Any]) -> Issued:
    """A checked request body's token for credentials: verify, identity, rules, mint."""
    identity = services.identify(body["provider"], body["token"], nonce=body.get("nonce"))
    return services.issue(
        identity, role_arn=body.get("role_arn"), duration_seconds=body.get("duration_seconds")
    )


def _container_token() -> str:
    """The provider token from ``Authorization``, as the AWS SDKs send
    ``AWS_CONTAINER_AUTHORIZATION_TOKEN`` (the raw value); ``Bearer TOKEN`` works too."""
    value = request.headers.get("Authorization", "").strip()
    value = bearer_token(value) or value
    if not value or value.lower() == "bearer":
        raise InvalidToken(
            "send the provider token in the Authorization header "
            "(AWS_CONTAINER_AUTHORIZATION_TOKEN or _TOKEN_FILE)"
        )
    if len(value) > MAX_TOKEN_CHARS:
        raise BadRequest("token is too long")
    return value


def _query_duration() -> int | None:
    raw = request.args.get("duration_seconds")
    if raw is None or raw == "":
        return None
    # isascii: str.isdigit() also takes superscripts and other scripts' digits.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 6:
        raise BadRequest("duration_seconds must be a whole number of seconds")
    return int(raw)


@blueprint.get("/container-credentials/<provider>")
def container_credentials(provider: str) -> Response:
    """The AWS container credentials format (what ECS and EKS Pod Identity serve), so
    SDKs refresh by themselves from ``AWS_CONTAINER_CREDENTIALS_FULL_URI``."""
    unknown = sorted(set(request.args) - {"role_arn", "duration_seconds"})
    if unknown:
        raise BadRequest(f"unknown query parameter(s): {', '.join(unknown)}")
    # The caller's own choices are checked before the token costs a verification.
    duration = _query_duration()
    token = _container_token()
    services = current_services()
    identity = services.identify(provider, token)
    issued = services.issue(
        identity,
        role_arn=request.args.get("role_arn") or None,
        duration_seconds=duration,
        self_renewing=True,
    )
    return jsonify(container_json(issued))


def container_json(issued: Issued) -> dict[str, str]:
    c = issued.credentials
    return {
        "AccessKeyId": c.access_key_id,
        "SecretAccessKey": c.secret_access_key,
        "Token": c.session_token,
        "Expiration": c.expiration_text,
        "RoleArn": issued.grant.role_arn,
    }


@blueprint.post("/roles")
def roles() -> Response:
    """The roles a token's identity may assume, without minting anything."""
    body = json_body({"provider": str, "token": str, "nonce": str}, required=("provider", "token"))
    services = current_services()
    identity = services.identify(body["provider"], body["token"], nonce=body.get("nonce"))
    rule = services.matching_rule(identity)
    return jsonify(
        {
            "identity_id": identity.identity_id,
            "provider": identity.provider,
            "roles": list(rule.roles),
            # Which rule granted each role (first match wins, so one rule grants all).
            "rule": rule.name,
            "grants": [{"role_arn": role, "rule": rule.name} for role in rule.roles],
        }
    )


def require_admin() -> None:
    """The operator endpoints answer only to ``admin.token``; off (404, as if absent)
    when none is configured, so a broker that never set one shows nothing of its rules."""
    require_bearer(current_services().settings.admin.token, what="admin token")


@blueprint.post("/explain")
def explain() -> Response:
    """What the rules would decide for the given claims, rule by rule. Nothing is
    minted: no STS call, no cache, no credentials."""
    require_admin()
    body = json_body(
        {"provider": str, "claims": dict, "role_arn": str, "duration_seconds": int},
        required=("provider", "claims"),
    )
    explanation = current_services().explain(
        body["provider"],
        body["claims"],
        role_arn=body.get("role_arn"),
        duration_seconds=body.get("duration_seconds"),
    )
    answer = explanation.to_json()
    audit_log.info(
        "explain",
        extra={
            "audit": {
                "event": "explain",
                "provider": answer["provider"],
                "identity_id": answer["identity_id"],
                "rule": answer["rule"],
                "allowed": answer["allowed"],
            }
        },
    )
    return jsonify(answer)
