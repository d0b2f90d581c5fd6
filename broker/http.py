"""Outbound HTTP to identity providers: one pooled session, timeouts always, one budget.

Promises (held by ``tests/unit/test_upstream_faults.py``):

* **One budget.** Every upstream call made through ``Http`` (JWKS, discovery, Login with
  Amazon, Facebook Graph) ends within ``budget_seconds`` (``[upstream] budget_seconds``)
  of its start, all attempts and the pauses between them included. Calls made inside
  ``with http.budget():`` share one deadline, so the verification of one token
  (discovery then JWKS; ``tokeninfo`` then the profile; the app token, ``debug_token``
  and ``/me``) spends at most one budget on its provider in total. Each attempt waits at
  most ``timeout`` per read, and at the deadline its socket is shut down (``_Watch``),
  so an upstream that trickles its status line, headers or body a byte at a time is
  cut off there too.
* **Bounded retries.** Connection failures, timeouts and 500/502/503/504 are retried up
  to ``retries`` times with an exponential pause, and only while the budget lasts.
* **Errors name what happened.** No answer in time is a 503 ``"... timed out after N s"``;
  no connection at all a 503 ``"... is unreachable"`` (both with ``Retry-After``); a 5xx,
  an oversized or unparseable body a 502 (``UpstreamError``).
* **No token in any message.** Messages name the upstream host, never the URL's query
  string, because query strings carry tokens (``tokeninfo?access_token=...``). For the
  same reason the requests/urllib3 exception is not chained onto ours: its message
  quotes the whole URL, and the error handlers log a cause chain with its traceback.

``SingleFlight`` is the other half of "a hung upstream never makes callers queue": one
fetch of a shared thing (a JWKS or discovery document, Facebook's app token) at a time
per process, the others never waiting behind it for long, and a failure backoff that
starts when the failed attempt *ends*.
"""

from __future__ import annotations

import contextvars
import json
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast
from urllib.parse import urlsplit

import requests
import urllib3.connection
import urllib3.connectionpool
import urllib3.exceptions
from requests.adapters import HTTPAdapter

from broker import metrics
from broker.errors import (
    BrokerError,
    DependencyUnavailable,
    UpstreamError,
    UpstreamThrottled,
)

T = TypeVar("T")

DEFAULT_TIMEOUT_SECONDS = 5.0
# The default of ``[upstream] budget_seconds``: two 5 s attempts, or three short ones.
DEFAULT_BUDGET_SECONDS = 10.0
# What a 503 from here tells the client to wait before trying again.
UNAVAILABLE_RETRY_AFTER_SECONDS = 5
# After a failed fetch of a shared document, how long to keep serving the last good one
# (or keep failing fast when there is none) before asking the upstream again.
FAILED_FETCH_BACKOFF_SECONDS = 10.0
# How long a caller with nothing to fall back on waits for a fetch another thread has in
# flight: a healthy IdP answers well within it (so a cold start makes one request, not
# a 503 per caller), a hung one does not (so callers fail fast instead of queueing).
FOLLOWER_WAIT_SECONDS = 1.0
# Retry-After for a caller turned away because another request is waiting on the upstream.
BUSY_RETRY_AFTER_SECONDS = 2
# Public keys, discovery documents and token checks are a few KiB; anything far larger is
# not an answer we want to hold in memory.
MAX_RESPONSE_BYTES = 1024 * 1024
_RETRY_STATUSES = frozenset({500, 502, 503, 504})
_CHUNK_BYTES = 16 * 1024

# The deadline of the ``Http.budget()`` scope the current thread is in (time.monotonic()).
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "broker_upstream_deadline", default=None
)


class _Watch:
    """The deadline of one attempt, enforced on its socket.

    A read timeout bounds each ``recv``, not a whole answer: an upstream that sends its
    status line and headers a byte at a time could hold a request far past its budget.
    At the deadline the watch shuts the socket down, which ends any read at once.
    """

    def __init__(self, deadline: float) -> None:
        self.fired = False
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def attach(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
            if self.fired:
                self._shutdown()

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            self._sock = None

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            self._shutdown()

    def _shutdown(self) -> None:
        if self._sock is not None:
            with suppress(OSError):  # already closed: nothing left to stop
                self._sock.shutdown(socket.SHUT_RDWR)


# The watch of the attempt this thread is making (set around each attempt).
_watch: contextvars.ContextVar[_Watch | None] = contextvars.ContextVar(
    "broker_upstream_watch", default=None
)


class _WatchedHTTPConnection(urllib3.connection.HTTPConnection):
    def getresponse(self) -> urllib3.response.HTTPResponse:  # type: ignore[override]
        watch = _watch.get()
        if watch is not None:
            watch.attach(self.sock)
        return super().getresponse()


class _WatchedHTTPSConnection(urllib3.connection.HTTPSConnection):
    def getresponse(self) -> urllib3.response.HTTPResponse:  # type: ignore[override]
        watch = _watch.get()
        if watch is not None:
            watch.attach(self.sock)
        return super().getresponse()


class _WatchedHTTPPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _Adapter(HTTPAdapter):
    """requests' adapter with connections whose sockets an attempt's ``_Watch`` can stop."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _WatchedHTTPPool,
            "https": _WatchedHTTPSPool,
        }


class HttpResult:
    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body


class _Failure(Exception):
    """One failed attempt: ``kind`` is "timeout", "unreachable" or "upstream"."""

    def __init__(self, kind: str, detail: str, *, retryable: bool) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.retryable = retryable


class Http:
    def __init__(
        self,
        *,
        retries: int = 2,
        backoff_seconds: float = 0.2,
        budget_seconds: float = DEFAULT_BUDGET_SECONDS,
    ) -> None:
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        self.budget_seconds = budget_seconds
        self.session = requests.Session()
        # Retries are ours (request_json), not urllib3's: urllib3 knows neither the budget
        # nor how to tell a timeout from a refused connection once it has given up.
        adapter = _Adapter(max_retries=0, pool_connections=16, pool_maxsize=64)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    @contextmanager
    def budget(self) -> Iterator[float]:
        """One deadline for every call made inside (nested scopes share the outer one)."""
        outer = _deadline.get()
        if outer is not None:
            yield outer
            return
        deadline = time.monotonic() + self.budget_seconds
        token = _deadline.set(deadline)
        try:
            yield deadline
        finally:
            _deadline.reset(token)

    @metrics.upstream_call
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
        started = time.monotonic()
        deadline = min(_deadline.get() or math.inf, started + self.budget_seconds)
        attempts = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _timed_out(what, host, started, attempts)
            attempts += 1
            try:
                return self._attempt(
                    method,
                    url,
                    timeout=min(timeout, remaining),
                    deadline=deadline,
                    params=params,
                    data=data,
                    headers=headers,
                    what=what,
                    host=host,
                )
            except _Failure as failure:
                pause = self.backoff_seconds * (2 ** (attempts - 1))
                if (
                    not failure.retryable
                    or attempts > self.retries
                    or time.monotonic() + pause >= deadline
                ):
                    if failure.kind == "timeout":
                        raise _timed_out(what, host, started, attempts) from None
                    if failure.kind == "unreachable":
                        raise DependencyUnavailable(
                            f"{what} ({host}) is unreachable",
                            retry_after=UNAVAILABLE_RETRY_AFTER_SECONDS,
                        ) from None
                    raise UpstreamError(f"{what} ({host}) {failure.detail}") from None
                time.sleep(pause)

    def _attempt(
        self,
        method: str,
        url: str,
        *,
        timeout: float,
        deadline: float,
        params: Mapping[str, str] | None,
        data: Mapping[str, str] | None,
        headers: Mapping[str, str] | None,
        what: str,
        host: str,
    ) -> HttpResult:
        watch = _Watch(deadline)
        token = _watch.set(watch)
        try:
            return self._watched_attempt(
                method,
                url,
                timeout=timeout,
                deadline=deadline,
                params=params,
                data=data,
                headers=headers,
                what=what,
                host=host,
            )
        except (_Failure, UpstreamError):
            if watch.fired:  # the deadline cut the answer short: that is a timeout
                raise _Failure("timeout", "timed out", retryable=False) from None
            raise
        finally:
            _watch.reset(token)
            watch.close()

    def _watched_attempt(
        self,
        method: str,
        url: str,
        *,
        timeout: float,
        deadline: float,
        params: Mapping[str, str] | None,
        data: Mapping[str, str] | None,
        headers: Mapping[str, str] | None,
        what: str,
        host: str,
    ) -> HttpResult:
        try:
            with self.session.request(
                method,
                url,
                params=params,
                data=data,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
                stream=True,
            ) as response:
                try:
                    return _json_result(response, deadline, what=what, host=host)
                finally:
                    # Before the connection goes back to the pool: a watch firing late
                    # must never stop a connection another request has taken.
                    watch = _watch.get()
                    if watch is not None:
                        watch.close()
        except requests.Timeout:
            raise _Failure("timeout", "timed out", retryable=True) from None
        except (requests.ConnectionError, urllib3.exceptions.ProtocolError):
            raise _Failure("unreachable", "is unreachable", retryable=True) from None
        except requests.RequestException:
            raise _Failure("unreachable", "is unreachable", retryable=False) from None

    def get_json(self, url: str, **kwargs: Any) -> HttpResult:
        return self.request_json("GET", url, **kwargs)

    def post_json(self, url: str, **kwargs: Any) -> HttpResult:
        return self.request_json("POST", url, **kwargs)

    def close(self) -> None:
        self.session.close()


def _json_result(
    response: requests.Response, deadline: float, *, what: str, host: str
) -> HttpResult:
    status = response.status_code
    if status >= 500:
        raise _Failure(
            "upstream", f"failed with HTTP {status}", retryable=status in _RETRY_STATUSES
        )
    raw = _read_body(response, deadline)
    try:
        body = json.loads(raw)
    except ValueError:
        raise UpstreamError(f"{what} ({host}) returned a malformed response") from None
    return HttpResult(status, body)


def _read_body(response: requests.Response, deadline: float) -> bytes:
    """The body, read against the deadline: each read waits at most the attempt's
    timeout, and an upstream that trickles bytes is cut off when the budget is spent."""
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            if time.monotonic() >= deadline:
                raise _Failure("timeout", "timed out", retryable=False)
            # read1: whatever has arrived (one recv), so the deadline is checked between
            # recvs; read() would wait for a full chunk however slowly it trickles in.
            chunk = response.raw.read1(_CHUNK_BYTES, decode_content=True)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise _Failure(
                    "upstream",
                    f"answered with more than {MAX_RESPONSE_BYTES} bytes",
                    retryable=False,
                )
            chunks.append(chunk)
    except (urllib3.exceptions.ReadTimeoutError, TimeoutError):
        raise _Failure("timeout", "timed out", retryable=True) from None
    except urllib3.exceptions.HTTPError:
        raise _Failure("unreachable", "is unreachable", retryable=True) from None


def _timed_out(what: str, host: str, started: float, attempts: int) -> DependencyUnavailable:
    spent = time.monotonic() - started
    tries = f", {attempts} attempts" if attempts > 1 else ""
    return DependencyUnavailable(
        f"{what} ({host}) timed out after {spent:.1f} s{tries}",
        retry_after=UNAVAILABLE_RETRY_AFTER_SECONDS,
    )


# --------------------------------------------------------------------------- singleflight


# The faults that mean "the upstream is sick": worth backing off from. A caller's
# mistake or our own configuration error is not a reason to stop asking.
BACKOFF_ERRORS: tuple[type[BrokerError], ...] = (
    UpstreamError,
    DependencyUnavailable,
    UpstreamThrottled,
)


@dataclass(frozen=True)
class Skipped:
    """``SingleFlight.run`` did not ask the upstream (backing off, or another fetch is
    still in flight); ``error`` is the 503 with ``Retry-After`` for a caller with
    nothing to fall back on."""

    error: DependencyUnavailable


class _Flight(Generic[T]):
    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: T | None = None
        self.error: BrokerError | None = None


class SingleFlight(Generic[T]):
    """At most one fetch in flight per process; callers never queue behind it.

    ``run(work, wait=...)``:

    * while the backoff after a failed fetch lasts, returns ``Skipped`` without calling
      ``work``. The backoff is measured from when the failed attempt *ended*, so a fetch
      that hung for its whole budget does not come back with its backoff already spent;
    * while another thread's fetch is in flight, waits for it at most ``wait`` seconds
      (callers holding a last good copy pass 0) and returns its value, or ``Skipped``;
    * otherwise calls ``work`` itself, outside any lock, and returns or raises what it
      does. A failure in ``BACKOFF_ERRORS`` starts the backoff.

    The lock only guards a few fields; no I/O ever happens under it.
    """

    def __init__(
        self,
        *,
        what: str,
        backoff_seconds: float = FAILED_FETCH_BACKOFF_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._what = what
        self._backoff = backoff_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._flight: _Flight[T] | None = None
        self._retry_at = -math.inf
        self._last_error: BrokerError | None = None

    def retry_in(self) -> float:
        """Seconds until the upstream may be asked again (0 when it may be now)."""
        return max(0.0, self._retry_at - self._clock())

    @property
    def last_error(self) -> BrokerError | None:
        """Why the last fetch failed; None once one has succeeded (or none has run)."""
        return self._last_error

    @property
    def in_flight(self) -> bool:
        return self._flight is not None

    def run(self, work: Callable[[], T], *, wait: float = FOLLOWER_WAIT_SECONDS) -> T | Skipped:
        with self._lock:
            backing_off = self.retry_in()
            flight = self._flight
            leader = flight is None and not backing_off
            if leader:
                flight = self._flight = _Flight()
        if backing_off:
            return self._skipped(f"not asked again for {math.ceil(backing_off)} s")
        assert flight is not None
        if not leader:
            if wait > 0:
                flight.done.wait(wait)
            if flight.done.is_set():
                if flight.error is None:
                    return cast(T, flight.value)
                return self._skipped("")
            return Skipped(
                DependencyUnavailable(
                    f"{self._what} is slow to answer; another request is already waiting for it",
                    retry_after=BUSY_RETRY_AFTER_SECONDS,
                )
            )
        try:
            value = work()
        except BACKOFF_ERRORS as exc:
            if exc.retry_after is None:
                exc.retry_after = max(1, math.ceil(self._backoff))
            flight.error = exc
            with self._lock:
                # From now: the moment the failed attempt ended.
                self._retry_at = self._clock() + self._backoff
                self._last_error = exc
                self._flight = None
            flight.done.set()
            raise
        except BaseException as exc:
            # Followers only need to know that it failed (they answer a 503 of their own).
            flight.error = (
                exc if isinstance(exc, BrokerError) else UpstreamError(f"{self._what} failed")
            )
            with self._lock:
                self._flight = None
            flight.done.set()
            raise
        # The result is on the flight before it is retired, so no follower misses it.
        flight.value = value
        with self._lock:
            self._retry_at = -math.inf
            self._last_error = None
            self._flight = None
        flight.done.set()
        return value

    def _skipped(self, note: str) -> Skipped:
        retry = max(1, math.ceil(self.retry_in() or FOLLOWER_WAIT_SECONDS))
        last = self._last_error
        cause = last.message if last is not None else f"{self._what} failed"
        return Skipped(
            DependencyUnavailable(f"{cause} ({note})" if note else cause, retry_after=retry)
        )
