"""``POST /v1/guest``: guest identities (broker.guest); 404 unless ``guest.enabled``."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from broker.services import current_services
from broker.sts import iso_utc
from broker.web.api import issued_json, json_body
from broker.web.security_headers import no_store

blueprint = Blueprint("guest", __name__, url_prefix="/v1")
# Responses carry credentials and the guest token: no cache may keep a copy.
blueprint.after_request(no_store)


@blueprint.post("/guest")
def guest() -> Response:
    body = json_body({"guest_token": str}, required=())
    issued, token, expires = current_services().guest(request.remote_addr, body.get("guest_token"))
    return jsonify(
        {**issued_json(issued), "guest_token": token, "guest_token_expires_at": iso_utc(expires)}
    )
