"""The benchmark's upstreams: an OIDC issuer's key set and an STS that answers late.

One asyncio process (``python -m bench.stand_ins --port N --key-file F --sts-latency-ms
50``) serves

* ``GET /jwks``: the public half of the RSA or EC P-256 key in ``--key-file`` (the
  benchmark signs its ID tokens with the private half, RS256 or ES256), so the broker
  verifies real signatures against a real key set;
* ``POST /`` (``Action=AssumeRoleWithWebIdentity``): STS's XML answer after
  ``--sts-latency-ms``, with credentials that expire in an hour. It checks nothing: the
  point is how many calls the broker makes and how many it keeps in flight, not STS's
  rules (the integration tests run moto for those);
* ``GET /stats``: ``{"sts_calls", "distinct_subjects", "max_in_flight"}``, and
  ``POST /stats/reset``.

It is light on purpose (no Flask, no thread per call, one small parser): on a 2-core
machine every cycle it spends is one the broker under test does not get.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import secrets
import signal
import time
from pathlib import Path
from urllib.parse import parse_qs

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

KID = "bench-key"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int_b64(value: int) -> str:
    return _b64(value.to_bytes((value.bit_length() + 7) // 8, "big"))


def public_jwks(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> dict[str, object]:
    if isinstance(key, rsa.RSAPrivateKey):
        public = key.public_key().public_numbers()
        jwk = {"kty": "RSA", "kid": KID, "alg": "RS256", "use": "sig"}
        return {"keys": [{**jwk, "n": _int_b64(public.n), "e": _int_b64(public.e)}]}
    numbers = key.public_key().public_numbers()
    return {
        "keys": [
            {
                "kty": "EC",
                "crv": "P-256",
                "kid": KID,
                "alg": "ES256",
                "use": "sig",
                "x": _b64(numbers.x.to_bytes(32, "big")),
                "y": _b64(numbers.y.to_bytes(32, "big")),
            }
        ]
    }


def _subject(token: str) -> str:
    """The token's ``sub``, unverified (the broker verified it; this only counts)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return str(claims.get("sub"))
    except (IndexError, ValueError):
        return ""


_XML = """<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>{sub}</SubjectFromWebIdentityToken>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::123456789012:assumed-role/bench/{session}</Arn>
      <AssumedRoleId>AROABENCHROLE0000000:{session}</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <AccessKeyId>ASIA{key_id}</AccessKeyId>
      <SecretAccessKey>{secret}</SecretAccessKey>
      <SessionToken>{session_token}</SessionToken>
      <Expiration>{expiration}</Expiration>
    </Credentials>
    <Audience>bench-client</Audience>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata><RequestId>{request_id}</RequestId></ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>"""


class StandIns:
    def __init__(
        self, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, sts_latency: float
    ) -> None:
        self.jwks = json.dumps(public_jwks(key)).encode()
        self.sts_latency = sts_latency
        self.calls = 0
        self.subjects: set[str] = set()
        self.in_flight = 0
        self.max_in_flight = 0

    def stats(self) -> bytes:
        return json.dumps(
            {
                "sts_calls": self.calls,
                "distinct_subjects": len(self.subjects),
                "max_in_flight": self.max_in_flight,
            }
        ).encode()

    async def sts(self, body: bytes) -> tuple[int, str, bytes]:
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        if form.get("Action") != "AssumeRoleWithWebIdentity":
            return 400, "text/plain", b"unsupported action"
        self.calls += 1
        self.subjects.add(_subject(form.get("WebIdentityToken", "")))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.sts_latency)
        finally:
            self.in_flight -= 1
        expiration = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
        xml = _XML.format(
            sub=_subject(form.get("WebIdentityToken", "")),
            session=form.get("RoleSessionName", "session"),
            key_id=secrets.token_hex(8).upper(),
            secret=secrets.token_urlsafe(30),
            session_token=secrets.token_urlsafe(120),
            expiration=expiration,
            request_id=secrets.token_hex(16),
        )
        return 200, "text/xml", xml.encode()

    async def answer(self, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        if method == "GET" and path == "/jwks":
            return 200, "application/json", self.jwks
        if method == "GET" and path == "/stats":
            return 200, "application/json", self.stats()
        if method == "POST" and path == "/stats/reset":
            self.calls, self.subjects, self.max_in_flight = 0, set(), 0
            return 200, "application/json", self.stats()
        if method == "POST" and path == "/":
            return await self.sts(body)
        return 404, "text/plain", b"not found"

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _version = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                body = await reader.readexactly(length) if length else b""
                status, kind, payload = await self.answer(method, target.split("?")[0], body)
                writer.write(
                    f"HTTP/1.1 {status} X\r\nContent-Type: {kind}\r\n"
                    f"Content-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()


async def serve(port: int, key_file: Path, sts_latency: float) -> None:
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    stand_ins = StandIns(key, sts_latency)
    server = await asyncio.start_server(stand_ins.connection, "127.0.0.1", port, backlog=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key-file", type=Path, required=True)
    parser.add_argument("--sts-latency-ms", type=float, default=50)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, args.key_file, args.sts_latency_ms / 1000))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
