"""The baseline: a bare Flask endpoint that parses the same JSON body as /v1/credentials.

It imports what the broker imports (``broker.app`` and, through it, Flask, redis-py,
requests, authlib, pyjwt, cryptography, botocore) and builds a botocore STS client as
the broker does, so its workers' memory is the floor the broker's is compared with:
what the broker adds on top of those libraries.
"""

from __future__ import annotations

from typing import Any

import botocore
import botocore.session
from botocore.config import Config
from flask import Flask, Response, jsonify, request

import broker.app  # noqa: F401 - the same imports as the broker, for the memory baseline

_clients: list[Any] = []


def create_app() -> Flask:
    app = Flask("bare")
    _clients.append(
        botocore.session.Session().create_client(
            "sts",
            region_name="us-east-1",
            endpoint_url="http://127.0.0.1:9",
            config=Config(signature_version=botocore.UNSIGNED),
        )
    )

    @app.post("/v1/credentials")
    def credentials() -> Response:
        body = request.get_json()
        return jsonify({"provider": body.get("provider"), "ok": True})

    return app
