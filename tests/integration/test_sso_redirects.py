"""Open-redirect attempts in ``next``, each through the whole sign-in flow.

Every payload goes in at ``/login/demo?next=...``, through the local OIDC provider and
the callback; the broker's final redirect must be exactly ``/``. Safe paths come back
unchanged. One row per payload: adding an attack is adding a line.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from broker.devstack.processes import free_port
from broker.devstack.stack import Stack
from tests.conftest import LiveBroker, make_settings, serve
from tests.integration.test_sso_flow import WebClient

pytestmark = pytest.mark.integration

OPEN_REDIRECTS = [
    # other hosts, plainly
    "https://evil.example",
    "http://evil.example/",
    "HTTPS://evil.example",
    "https:evil.example",
    "//evil.example",
    "//evil.example/",
    "///evil.example",
    "////evil.example",
    "//evil.example@127.0.0.1",
    "//127.0.0.1@evil.example",
    "http://127.0.0.1@evil.example",
    "evil.example",
    "evil.example/path",
    "@evil.example",
    # backslashes, which browsers read as slashes
    "/\\evil.example",
    "\\\\evil.example",
    "\\/evil.example",
    "/\\/evil.example",
    "/path\\..\\..\\evil",
    # schemes
    "javascript:alert(document.domain)",
    "JaVaScRiPt:alert(1)",
    "javascript://%0aalert(1)",
    "data:text/html,<script>alert(1)</script>",
    "data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==",
    "vbscript:msgbox(1)",
    "file:///etc/passwd",
    "ftp://evil.example",
    # percent-encoded slashes and backslashes, once, twice, three times
    "/%2F%2Fevil.example",
    "/%2f%2fevil.example",
    "/%2F/evil.example",
    "%2F%2Fevil.example",
    "/%5Cevil.example",
    "/%5c%5cevil.example",
    "/%252F%252Fevil.example",
    "/%255Cevil.example",
    "/%25252F%25252Fevil.example",
    "%68%74%74%70%73%3a%2f%2fevil.example",
    # whitespace and control characters browsers strip or act on
    "/\t/evil.example",
    "/\n/evil.example",
    "/\r\n/evil.example",
    "/%09/evil.example",
    "/%0a/evil.example",
    "/%0d%0aSet-Cookie:x=1",
    "/%00/evil.example",
    " //evil.example",
    "\t//evil.example",
    # Unicode look-alikes of '/' and '.'
    "/\uff0fevil.example",
    "/\u2215evil.example",
    "/%EF%BC%8Fevil.example",
    "/%E2%88%95evil.example",
    "\u3002evil.example",
    # relative references that are not paths from the root
    "credentials",
    "./credentials",
    "../credentials",
    "?next=//evil.example",
    "#//evil.example",
    # markup and malformed escapes
    '/"><script>alert(1)</script>',
    "/<img src=x onerror=alert(1)>",
    "/%",
    "/%zz",
    "/%FF",
    "/" + "a" * 2000,
]

SAFE = [
    "/",
    "/credentials",
    "/credentials?role_arn=arn:aws:iam::123456789012:role/BrokerDemoUser",
    "/some/page#section",
    "/search?q=a%20b",
]


@pytest.fixture(scope="module")
def module_broker(stack: Stack) -> Iterator[LiveBroker]:
    # One broker for the whole table keeps the 60-odd sign-ins fast.
    port = free_port()
    settings = make_settings(
        stack,
        f"http://127.0.0.1:{port}",
        rate_limit={"per_ip_per_minute": 0, "per_identity_per_minute": 0},
    )
    with serve(settings, stack, port) as live:
        yield live


def test_the_table_is_big_enough() -> None:
    assert len(OPEN_REDIRECTS) >= 50


@pytest.mark.parametrize("payload", OPEN_REDIRECTS)
def test_open_redirect_payload_falls_back_to_root(module_broker: LiveBroker, payload: str) -> None:
    web = WebClient(module_broker)
    r = web.login("alice", next_path=payload)
    assert r.status_code == 303, r.text
    assert r.headers["Location"] == "/"
    # The login page never echoes the payload into its provider links either.
    page = web.get("/login", params={"next": payload})
    assert 'href="/login/demo"' in page.text


@pytest.mark.parametrize("path", SAFE)
def test_same_origin_paths_are_kept(module_broker: LiveBroker, path: str) -> None:
    r = WebClient(module_broker).login("alice", next_path=path)
    assert r.status_code == 303
    assert r.headers["Location"] == path
