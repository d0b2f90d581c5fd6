"""Outbound HTTP to identity providers: one pooled session, timeouts always, bounded retries.

Upstream failures become our errors here, in one place: unreachable or timing out is a
503 (``DependencyUnavailable``); a 5xx or an unparseable body is a 502
(``UpstreamError``). Messages name the upstream host, never the URL's query string,
because query strings carry tokens (``tokeninfo?access_token=...``). For the same
reason the requests/urllib3 exception is not chained onto ours: its message quotes the
whole URL, and the error handlers log a cause chain with its traceback.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from broker.errors import DependencyUnavailable, UpstreamError

DEFAULT_TIMEOUT_SECONDS = 5.0


class HttpResult:
    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body


class Http:
    def __init__(self, *, retries: int = 2, backoff_seconds: float = 0.2) -> None:
        self.session = requests.Session()
        retry = Retry(
            total=retries,
            connect=retries,
            read=retries,
            status=retries,
            backoff_factor=backoff_seconds,
            status_forcelist=(500, 502, 503, 504),
            allowed_methods=frozenset({"GET", "POST"}),
            raise_on_status=False,
            respect_retry_after_header=False,
        )
        adapter = HTTPAdapter(max_retries=retry, pool_connections=16, pool_maxsize=64)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def request_json(
        self,
        method: str,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        params: Mapping[str, str] | None = None,
        data: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        what: str = "upstream",
    ) -> HttpResult:
        """Send a request and parse JSON. 4xx bodies come back to the caller to interpret;
        transport faults, 5xx and non-JSON bodies raise."""
        host = urlsplit(url).netloc
        try:
            response = self.session.request(
                method,
                url,
                params=params,
                data=data,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            )
        except requests.Timeout:
            raise DependencyUnavailable(f"{what} ({host}) timed out") from None
        except requests.RequestException as exc:
            # Includes retries exhausted on 5xx (urllib3 MaxRetryError -> RetryError).
            if isinstance(exc, requests.exceptions.RetryError):
                raise UpstreamError(f"{what} ({host}) kept failing") from None
            raise DependencyUnavailable(f"{what} ({host}) is unreachable") from None
        if response.status_code >= 500:
            raise UpstreamError(f"{what} ({host}) failed with HTTP {response.status_code}")
        try:
            body = response.json()
        except ValueError as exc:
            raise UpstreamError(f"{what} ({host}) returned a malformed response") from exc
        return HttpResult(response.status_code, body)

    def get_json(self, url: str, **kwargs: Any) -> HttpResult:
        return self.request_json("GET", url, **kwargs)

    def post_json(self, url: str, **kwargs: Any) -> HttpResult:
        return self.request_json("POST", url, **kwargs)

    def close(self) -> None:
        self.session.close()
