"""The checks every door shares: one way to read a bearer token, one way to compare a
secret, one way to tell that a host is this machine.

No Flask here: the exec credential server (``broker.client.exec``) and the command line
use these too. The web's guards that raise the broker's errors build on them
(``broker.web.guards``).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from urllib.parse import urlsplit


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value (any case of ``Bearer``,
    spaces around the token ignored), or None when the value is not one."""
    scheme, _, token = (header or "").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def same_secret(given: str | None, expected: str) -> bool:
    """Whether ``given`` is ``expected``, in constant time over their digests: neither
    the content nor the length of the secret leaks through timing."""
    matches = hmac.compare_digest(
        hashlib.sha256((given or "").encode()).digest(),
        hashlib.sha256(expected.encode()).digest(),
    )
    return given is not None and matches


def local_sts_endpoint(url: str | None) -> str | None:
    """``url`` when it is an STS on this machine (the dev stack's moto), else None: the
    one endpoint the broker ever tells the AWS tools to use instead of AWS's."""
    return url if url and is_loopback_host(urlsplit(url).hostname) else None


def is_loopback_host(host: str | None, *, allow_localhost: bool = True) -> bool:
    """Whether ``host`` (a URL's hostname: no brackets, no port) is this machine: a
    loopback IP literal, or ``localhost`` unless ``allow_localhost`` is False. OAuth
    redirects pass False: RFC 8252 section 8.3 advises against the name, which a
    resolver or a hosts file may point elsewhere."""
    if not host:
        return False
    if host.lower() == "localhost":
        return allow_localhost
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
