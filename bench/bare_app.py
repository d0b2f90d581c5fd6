"""The baseline: a bare Flask endpoint that parses the same JSON body as /v1/credentials."""

from __future__ import annotations

from flask import Flask, Response, jsonify, request


def create_app() -> Flask:
    app = Flask("bare")

    @app.post("/v1/credentials")
    def credentials() -> Response:
        body = request.get_json()
        return jsonify({"provider": body.get("provider"), "ok": True})

    return app
