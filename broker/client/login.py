"""``broker login``: the OAuth ways for native apps, against the broker's web sign-in.

* Loopback (RFC 8252): a one-shot HTTP listener on 127.0.0.1 and a random port receives
  the browser's redirect; PKCE (S256) binds the code to this process, and ``state`` to
  this attempt.
* Device (RFC 8628, ``--device``): for a terminal with no browser; the person types a
  short code at the broker's ``/device`` page on any device.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

from broker.client.errors import CLIError, command
from broker.client.session import BrokerAPIError, BrokerClient, CLISession

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
CALLBACK_PATH = "/callback"
# The last page of the sign-in, served by this terminal's listener: styled like the
# broker's pages (no stylesheet to fetch from here), phone-sized.
_DONE_PAGE = (
    b"<!doctype html><html lang=en><meta charset=utf-8>"
    b'<meta name=viewport content="width=device-width, initial-scale=1">'
    b"<title>broker login</title><style>"
    b"body{font:16px/1.5 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;"
    b"color:#1f2933;background:#fff;max-width:36rem;margin:3rem auto;padding:0 1rem}"
    b"h1{font-size:1.5rem;margin:0 0 .5rem}p{color:#52606d}"
    b"</style><h1>%s</h1><p>You can close this tab and return to your terminal.</p>"
)


@dataclass
class _Answer:
    query: dict[str, str] | None = None


def _pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(64)  # 86 characters, within RFC 7636's 43-128
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    return verifier, challenge.rstrip(b"=").decode()


def _listener(answer: _Answer, arrived: threading.Event, state: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(parts.query).items() if v}
            # Anything else on this machine may knock first: only the answer carrying
            # this attempt's state counts, the rest is ignored and the wait goes on.
            right_state = hmac.compare_digest(query.get("state", "").encode(), state.encode())
            if parts.path != CALLBACK_PATH or answer.query is not None or not right_state:
                self.send_error(404)
                return
            answer.query = query
            ok = "code" in query
            body = _DONE_PAGE % (b"Signed in." if ok else b"The sign-in did not complete.")
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)
            arrived.set()

        def log_message(self, *_args: object, **_kwargs: object) -> None:
            return  # the query holds a one-time code: keep it off the terminal

    return ThreadingHTTPServer(("127.0.0.1", 0), Handler)


def check_browser_provider(client: BrokerClient, provider: str) -> None:
    """Refuse at once a provider the broker does not have, or has for apps only, rather
    than send the person to a page that says so while this terminal waits."""
    listed = client.call("GET", "/v1/providers").get("providers")
    known = {p["name"]: p for p in listed or [] if isinstance(p, dict) and "name" in p}
    browser = sorted(name for name, p in known.items() if p.get("browser_sign_in"))
    if provider not in known:
        raise CLIError(
            f"the broker at {client.url} has no provider {provider!r}; "
            f"sign in with one of: {', '.join(browser) or 'none'}"
        )
    if provider not in browser:
        raise CLIError(
            f"provider {provider!r} at {client.url} takes app tokens only (no browser "
            f"sign-in); sign in with one of: {', '.join(browser) or 'none'}"
        )


def login_loopback(
    client: BrokerClient,
    *,
    provider: str | None,
    open_browser: Callable[[str], bool],
    say: Callable[[str], None],
    timeout: float = 600.0,
) -> CLISession:
    if provider:
        check_browser_provider(client, provider)
    verifier, challenge = _pkce_pair()
    answer = _Answer()
    arrived = threading.Event()
    state = secrets.token_urlsafe(24)
    server = _listener(answer, arrived, state)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        redirect_uri = f"http://127.0.0.1:{server.server_address[1]}{CALLBACK_PATH}"
        params = {
            "redirect_uri": redirect_uri,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "state": state,
        }
        if provider:
            params["provider"] = provider
        url = f"{client.url}/cli/authorize?{urlencode(params)}"
        if open_browser(url):
            say(f"Opened your browser to sign in. If it did not open, visit:\n  {url}")
        else:
            say(f"Open this address in your browser to sign in:\n  {url}")
        if not arrived.wait(timeout):
            raise CLIError(f"no answer from the browser within {timeout:.0f} s; try again")
    finally:
        server.shutdown()
        server.server_close()
    query = answer.query or {}
    if not hmac.compare_digest(query.get("state", "").encode(), state.encode()):
        raise CLIError("the browser's answer is not for this sign-in (state mismatch)")
    if "code" not in query:
        raise CLIError(f"the sign-in was not completed: {query.get('error', 'no code')}")
    token = client.call(
        "POST",
        "/v1/cli/token",
        body={
            "grant_type": "authorization_code",
            "code": query["code"],
            "code_verifier": verifier,
            "redirect_uri": redirect_uri,
        },
    )
    return CLISession.from_answer(client.url, token)


def login_device(
    client: BrokerClient,
    *,
    provider: str | None,
    say: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
) -> CLISession:
    start = client.call("POST", "/v1/cli/device", body={"provider": provider} if provider else None)
    say(
        f"To sign in, open {start['verification_uri']} on any device and enter the code"
        f"\n\n    {start['user_code']}\n\nor open {start['verification_uri_complete']}"
    )
    interval = float(start.get("interval", 5))
    deadline = time.monotonic() + float(start.get("expires_in", 600))
    while time.monotonic() < deadline:
        sleep(interval)
        try:
            token = client.call(
                "POST",
                "/v1/cli/token",
                body={"grant_type": DEVICE_GRANT, "device_code": start["device_code"]},
            )
        except BrokerAPIError as exc:
            if exc.code == "authorization_pending":
                continue
            if exc.code == "slow_down":
                interval += 5  # RFC 8628 section 3.5
                continue
            raise CLIError(f"sign-in failed: {exc.reason or exc.code}") from None
        return CLISession.from_answer(client.url, token)
    raise CLIError(
        f"the code expired before the sign-in was approved; run {command('login')} again"
    )
