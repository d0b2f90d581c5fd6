"""Typed configuration, loaded and validated once at start-up.

Sources, later wins: the TOML file, then ``BROKER_*`` environment variables
(``BROKER_REDIS__URL=...``: double underscores separate the key path; the value is read
as a TOML value when it parses as one, else as a plain string). Any key ``name_file``
supplies the value of ``name`` from a file (secrets mounted by an orchestrator).

Every problem is collected and reported at once, each naming its key; unknown keys are
errors, because a misspelt key in a role rule must stop the start, not open a hole.
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import json
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast
from urllib.parse import urlsplit

from broker.limits import (
    ISSUER_MAX_TOKEN_SECONDS,
    POLICY_ARN_RE,
    ROLE_ARN_RE,
    STS_MAX_DURATION,
    STS_MAX_POLICY_ARNS,
    STS_MAX_TAG_VALUE_CHARS,
    STS_MAX_TAGS,
    STS_MIN_DURATION,
    tag_key_problem,
    tag_text_ok,
)
from broker.policy_template import check_policy_template

ENV_PREFIX = "BROKER_"
CONFIG_ENV = "BROKER_CONFIG"

# Clock skew tolerated on exp/nbf/iat. A minute covers phones with drifting clocks and
# NTP-less containers; more would let a stolen, just-expired token live noticeably longer.
DEFAULT_LEEWAY_SECONDS = 60

# gunicorn's worker timeout (broker.server.gunicorn_options). Whatever a request waits on
# must end well within it, so the upstream budget may be at most half of it.
WORKER_TIMEOUT_SECONDS = 30
# ``[server] worker_class``: the gunicorn worker models broker.server defines.
WORKER_CLASSES = frozenset({"gthread", "gevent"})
MAX_UPSTREAM_BUDGET_SECONDS = WORKER_TIMEOUT_SECONDS / 2

PROVIDER_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
# An identity id is "<region>:<uuid>" (broker.identity) and goes into session policies
# and S3 prefixes, so the region keeps to the characters a policy value may hold and
# leaves room for the 37 after it within the 64 one may have (broker.policy).
IDENTITY_REGION_RE = re.compile(r"[A-Za-z0-9_+=,.@-]{1,27}", re.ASCII)
Operator = Literal["equals", "not_equals", "contains", "starts_with", "glob", "in"]
OPERATORS: tuple[Operator, ...] = ("equals", "not_equals", "contains", "starts_with", "glob", "in")
ProviderType = Literal["oidc", "google", "developer", "amazon", "facebook"]
# Which token STS receives for a rule: the provider's own (IAM trusts the provider) or
# one the broker signs (IAM trusts the broker; needed for session tags and source identity).
StsToken = Literal["provider", "broker"]
STS_TOKENS: tuple[StsToken, ...] = ("provider", "broker")
IssuerAlgorithm = Literal["RS256", "ES256"]

GOOGLE_ISSUERS = ("https://accounts.google.com", "accounts.google.com")
GOOGLE_JWKS_URL = "https://www.googleapis.com/oauth2/v3/certs"
GOOGLE_DISCOVERY_URL = "https://accounts.google.com/.well-known/openid-configuration"


class ConfigError(Exception):
    """All problems found in one load, each naming its key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration ({len(problems)} problem(s)):\n{lines}")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    public_url: str  # the broker's own external URL (OAuth redirect URIs, console Issuer)
    max_body_bytes: int = 64 * 1024
    # How many reverse proxies in front of the broker may set X-Forwarded-*; 0 = none.
    trusted_proxies: int = 0
    # debug | info | warning | error; info keeps the audit trail (one line per issue).
    log_level: str = "info"
    # Tell a refused person why, in words they can act on ("your e-mail address is not
    # verified at ..."); off keeps rule internals private (a bare "no rule matches").
    explain_denials: bool = True
    # gunicorn's worker model (``broker.server``): "gthread" holds one thread per request
    # in flight; "gevent" one greenlet, so requests waiting on STS or an IdP are not
    # capped by a thread count.
    worker_class: str = "gthread"


@dataclass(frozen=True, kw_only=True)
class AdminSettings:
    # Bearer token for the operator endpoints (POST /v1/explain); None: they are off.
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, kw_only=True)
class IssuerSettings:
    """The broker as an OpenID issuer for STS (broker.issuer)."""

    audience: str = "sts.amazonaws.com"  # the `aud` of every broker token
    algorithm: IssuerAlgorithm = "RS256"  # for generated keys; file keys bring their own
    token_seconds: int = ISSUER_MAX_TOKEN_SECONDS
    # PEM private keys from files: the first signs, all are published. Empty: keys are
    # generated and kept sealed in Redis, shared by every node.
    key_pems: tuple[bytes, ...] = field(default=(), repr=False)
    # Generated keys: a new one is made after this long, published publish_ahead_seconds
    # before it signs anything, so verifiers that cache the JWKS already know it.
    rotate_after_seconds: int = 30 * 86400
    publish_ahead_seconds: int = 3600


@dataclass(frozen=True, kw_only=True)
class GuestSettings:
    """Guest identities (broker.guest): off unless enabled and given a role."""

    enabled: bool = False
    role_arn: str | None = None
    duration_seconds: int = 900
    session_policy: Mapping[str, Any] | None = None  # a template, as for rules
    # Strict, per client address, shared by every process: new guests an hour, and
    # requests (new or returning) a minute.
    new_per_ip_per_hour: int = 10
    per_ip_per_minute: int = 20
    token_days: int = 90  # how long a device may come back as the same guest


@dataclass(frozen=True, kw_only=True)
class RedisSettings:
    url: str
    key_prefix: str
    socket_timeout_seconds: float
    mode: Literal["standalone", "sentinel", "cluster"] = "standalone"
    sentinels: tuple[tuple[str, int], ...] = ()
    sentinel_service: str = ""
    # ACL user (Redis 6+) and password for the data nodes (standalone, the Sentinel
    # master, every Cluster node); a password without a user is the legacy AUTH.
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    # The sentinels' own credentials, when they require AUTH (often different).
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    # TLS to every node (and, in Sentinel mode, to the sentinels too). The server
    # certificate and its hostname are always verified: against tls_ca_path when set,
    # else the system's CAs. A client certificate is sent when tls_cert_path is set.
    tls: bool = False
    tls_ca_path: str | None = None
    tls_cert_path: str | None = None
    tls_key_path: str | None = None

    def target(self) -> str:
        """Where the broker looks for Redis, for messages: never a user or password."""
        if self.mode == "sentinel":
            where = ", ".join(f"{host}:{port}" for host, port in self.sentinels)
            return f"Sentinel service {self.sentinel_service!r} at {where}"
        parts = urlsplit(self.url)
        if parts.scheme == "unix":
            return f"unix:{parts.path}"
        host = parts.hostname or "localhost"
        shown = f"[{host}]" if ":" in host else host
        address = f"{parts.scheme}://{shown}:{parts.port or 6379}{parts.path}"
        return f"Cluster at {address}" if self.mode == "cluster" else address

    def addresses(self) -> tuple[tuple[str, int], ...]:
        """The TCP addresses to try first (the sentinels, or the URL's host)."""
        if self.mode == "sentinel":
            return self.sentinels
        parts = urlsplit(self.url)
        if parts.scheme == "unix":
            return ()
        return ((parts.hostname or "localhost", parts.port or 6379),)


@dataclass(frozen=True, kw_only=True)
class SecuritySettings:
    identity_key: bytes = field(repr=False)  # HMAC key for identity ids
    # First key encrypts; all keys decrypt, so keys can be rotated without a flush.
    encryption_keys: tuple[bytes, ...] = field(repr=False)


@dataclass(frozen=True, kw_only=True)
class STSSettings:
    region: str
    endpoint_url: str | None
    timeout_seconds: float
    max_attempts: int  # total attempts for retryable STS errors (IDPCommunicationError)


@dataclass(frozen=True, kw_only=True)
class CacheSettings:
    enabled: bool
    # Cached credentials are dropped this long before they expire, so no caller is
    # handed credentials that die a few seconds later.
    safety_margin_seconds: int
    lock_timeout_seconds: float  # how long a singleflight lock may be held
    lock_wait_seconds: float  # how long a follower waits for the leader's result
    # How long one worker may serve credentials from its own memory before asking
    # Redis again (0: always ask Redis). Bounds how stale a worker's view of a
    # forget() (logout) made by another worker can be.
    local_seconds: int = 30
    # Answer a byte-identical repeat of a POST /v1/credentials from the worker's memory
    # (within local_seconds; still rate-limited and audited). See broker.web.exchange.
    replay: bool = True


@dataclass(frozen=True, kw_only=True)
class UpstreamSettings:
    # The most one request may spend on one identity provider (JWKS, discovery, Login
    # with Amazon, Facebook Graph): every attempt, timeout and pause between retries.
    budget_seconds: float = 10.0


@dataclass(frozen=True, kw_only=True)
class IdentitySettings:
    region: str  # prefix of identity ids, like Cognito's "us-east-1:uuid"


@dataclass(frozen=True, kw_only=True)
class RateLimitSettings:
    per_ip_per_minute: int  # 0 disables
    per_identity_per_minute: int  # 0 disables


# A cookie name that needs no quoting anywhere (RFC 6265 token, narrowed).
COOKIE_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)


@dataclass(frozen=True, kw_only=True)
class WebSettings:
    # The base name; with cookie_secure the broker sends it as __Host-<name>
    # (broker.sessions.cookie_name).
    session_cookie: str
    cookie_secure: bool
    session_idle_seconds: int
    session_absolute_seconds: int
    login_state_ttl_seconds: int


@dataclass(frozen=True, kw_only=True)
class CLISettings:
    """Sessions of the ``broker`` command line tool (``broker login``): server-side like
    browser sessions, held by the CLI as a bearer secret."""

    enabled: bool
    session_idle_seconds: int
    session_absolute_seconds: int
    # How long a started loopback or device login may wait for the person's approval.
    login_ttl_seconds: int
    # The device flow's polling interval (RFC 8628 section 3.2 ``interval``).
    device_poll_seconds: int


@dataclass(frozen=True, kw_only=True)
class ConsoleSettings:
    # Overrides the partition's federation endpoint (tests and the dev stack).
    federation_url: str | None
    timeout_seconds: float


@dataclass(frozen=True, kw_only=True)
class MetricsSettings:
    # Bearer token that opens GET /metrics on the main listener; None: no such route.
    token: str | None = field(default=None, repr=False)
    # (host, port) of a separate metrics listener in the gunicorn master; None: none.
    listen: tuple[str, int] | None = None


@dataclass(frozen=True, kw_only=True)
class OIDCProviderSettings:
    name: str
    # "developer": tokens signed by the operator's own backend, keys from a JWKS file
    # (static_jwks), no discovery; API only, and only with the broker's token for STS.
    type: Literal["oidc", "google", "developer"]
    display_name: str
    issuers: tuple[str, ...]  # accepted `iss` values, compared exactly
    client_ids: tuple[str, ...]  # accepted `aud` values
    discovery_url: str | None
    jwks_url: str | None
    algorithms: tuple[str, ...]
    leeway_seconds: int
    jwks_cache_seconds: int
    jwks_refresh_cooldown_seconds: int  # one refresh earned back per this many seconds
    timeout_seconds: float
    require_nonce: bool
    # Refreshes on an unknown kid allowed at once (a token bucket shared in Redis).
    jwks_refresh_burst: int = 3
    # Browser flow (issue: web SSO); empty when the provider is API-only.
    client_secret: str | None = field(default=None, repr=False)
    scopes: tuple[str, ...] = ("openid", "email", "profile")
    static_jwks: Mapping[str, Any] | None = None  # a JWKS document (developer providers)


@dataclass(frozen=True, kw_only=True)
class AmazonProviderSettings:
    name: str
    type: Literal["amazon"]
    display_name: str
    client_ids: tuple[str, ...]
    api_url: str
    timeout_seconds: float
    client_secret: str | None = field(default=None, repr=False)
    authorize_url: str = "https://www.amazon.com/ap/oa"
    scopes: tuple[str, ...] = ("profile",)


@dataclass(frozen=True, kw_only=True)
class FacebookProviderSettings:
    name: str
    type: Literal["facebook"]
    display_name: str
    app_id: str
    app_secret: str = field(repr=False)
    graph_url: str
    graph_version: str
    timeout_seconds: float
    limited_login: bool
    limited_login_issuer: str
    limited_login_jwks_url: str
    limited_login_sts_ready: bool  # the operator created the IAM OIDC provider for it
    dialog_url: str = "https://www.facebook.com/v19.0/dialog/oauth"
    scopes: tuple[str, ...] = ("public_profile", "email")


ProviderSettings = OIDCProviderSettings | AmazonProviderSettings | FacebookProviderSettings


@dataclass(frozen=True, kw_only=True)
class Condition:
    claim: str
    op: Operator
    value: str | tuple[str, ...]  # a tuple only for `in`


@dataclass(frozen=True, kw_only=True)
class RuleSettings:
    name: str
    providers: tuple[str, ...]
    conditions: tuple[Condition, ...]
    roles: tuple[str, ...]
    require_email_verified: bool
    require_mfa: bool
    mfa_amr_values: tuple[str, ...]  # any one of these in `amr` satisfies require_mfa
    mfa_acr_values: tuple[str, ...]  # ...or an `acr` equal to one of these
    default_duration_seconds: int
    max_duration_seconds: int
    session_policy: Mapping[str, Any] | None  # a JSON policy template
    policy_arns: tuple[str, ...]
    sts_token: StsToken = "provider"  # noqa: S105 - a kind of token, not a secret
    principal_tags: tuple[tuple[str, TagSource], ...] = ()  # tag key -> where its value is
    transitive_tag_keys: tuple[str, ...] = ()
    source_identity_claim: str | None = None

    @property
    def broker_token(self) -> bool:
        """Whether STS receives the broker's own token for this rule."""
        return self.sts_token == "broker"  # noqa: S105 - a kind of token, not a secret


@dataclass(frozen=True, kw_only=True)
class TagSource:
    """A session tag's value: a verified claim (dotted path) or a fixed value."""

    claim: str | None = None
    value: str | None = None


@dataclass(frozen=True, kw_only=True)
class Settings:
    server: ServerSettings
    redis: RedisSettings
    security: SecuritySettings
    sts: STSSettings
    cache: CacheSettings
    identity: IdentitySettings
    rate_limit: RateLimitSettings
    web: WebSettings
    cli: CLISettings
    console: ConsoleSettings
    providers: Mapping[str, ProviderSettings]
    rules: tuple[RuleSettings, ...]
    admin: AdminSettings = AdminSettings()
    # Digest of the effective configuration: part of credential cache keys, so a rule
    # or policy change never serves credentials minted under the old rules.
    config_version: str
    source: str  # where the config came from, for messages
    upstream: UpstreamSettings = UpstreamSettings()
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    issuer: IssuerSettings = IssuerSettings()
    guest: GuestSettings = GuestSettings()


# --------------------------------------------------------------------------- reading

T = TypeVar("T")
_MISSING: Any = object()


class _Reader:
    """Reads one table, remembering which keys were used and every problem seen."""

    def __init__(self, data: Mapping[str, Any], path: str, problems: list[str]) -> None:
        self.data = data
        self.path = path
        self.problems = problems
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def problem(self, name: str, text: str) -> None:
        self.problems.append(f"{self.key(name)}: {text}")

    def raw(self, name: str) -> Any:
        self.used.add(name)
        return self.data.get(name, _MISSING)

    def _typed(self, name: str, default: T, kinds: tuple[type, ...], what: str) -> T:
        value = self.raw(name)
        if value is _MISSING:
            if default is _MISSING:
                self.problem(name, "is required")
                return cast(T, None)
            return default
        if isinstance(value, bool) and bool not in kinds:
            self.problem(name, f"must be {what}, got {type(value).__name__}")
            return default if default is not _MISSING else cast(T, None)
        if not isinstance(value, kinds):
            self.problem(name, f"must be {what}, got {type(value).__name__}")
            return default if default is not _MISSING else cast(T, None)
        return cast(T, value)

    def text(self, name: str, default: Any = _MISSING, *, allow_empty: bool = False) -> Any:
        value = self._typed(name, default, (str,), "a string")
        if isinstance(value, str) and not value and not allow_empty and default is _MISSING:
            self.problem(name, "must not be empty")
        return value

    def opt_str(self, name: str) -> str | None:
        value = self._typed(name, None, (str,), "a string")
        return value or None

    def flag(self, name: str, default: Any = _MISSING) -> Any:
        return self._typed(name, default, (bool,), "true or false")

    def integer(self, name: str, default: Any = _MISSING, *, lo: int, hi: int) -> Any:
        value = self._typed(name, default, (int,), "an integer")
        if isinstance(value, int) and not lo <= value <= hi:
            self.problem(name, f"must be between {lo} and {hi}, got {value}")
        return value

    def number(self, name: str, default: Any = _MISSING, *, lo: float, hi: float) -> Any:
        value = self._typed(name, default, (int, float), "a number")
        if isinstance(value, int | float) and not lo <= value <= hi:
            self.problem(name, f"must be between {lo} and {hi}, got {value}")
        return float(value) if isinstance(value, int | float) else value

    def str_list(self, name: str, default: Any = _MISSING, *, nonempty: bool = False) -> Any:
        value = self.raw(name)
        if value is _MISSING:
            if default is _MISSING:
                self.problem(name, "is required")
                return ()
            value = default
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
            self.problem(name, "must be a list of non-empty strings")
            return ()
        if nonempty and not value:
            self.problem(name, "must not be empty")
        return tuple(value)

    def url(self, name: str, default: Any = _MISSING) -> Any:
        value = self.text(name, default)
        if isinstance(value, str) and value and not _is_http_url(value):
            self.problem(name, f"must be an http(s) URL, got {value!r}")
        return value

    def opt_url(self, name: str) -> str | None:
        value = self.opt_str(name)
        if value and not _is_http_url(value):
            self.problem(name, f"must be an http(s) URL, got {value!r}")
        return value

    def table(self, name: str) -> _Reader:
        value = self.raw(name)
        if value is _MISSING:
            value = {}
        if not isinstance(value, Mapping):
            self.problem(name, "must be a table")
            value = {}
        return _Reader(value, self.key(name), self.problems)

    def finish(self) -> None:
        for name in sorted(set(self.data) - self.used):
            self.problems.append(f"{self.key(name)}: unknown key{did_you_mean(name, self.used)}")


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """ " (did you mean 'x'?)" for the closest known key, or "" when none is close."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_http_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in {"http", "https"} and bool(parts.netloc)


def _secret_bytes(value: str) -> bytes:
    """Secrets are base64 (standard or url-safe) or, failing that, raw text."""
    text = value.strip()
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except ValueError:
        pass
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except ValueError:
        return text.encode()


# --------------------------------------------------------------------------- merging


def _parse_env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def is_override(name: str) -> bool:
    """Whether environment variable ``name`` is a config override.

    Only ``BROKER_<SECTION>__<KEY>`` names are: every setting lives in a section, so an
    override always has a double underscore. Other ``BROKER_*`` variables (run.py's
    ``BROKER_VENV``, ``BROKER_CONFIG``) belong to someone else and are left alone.
    """
    return name.startswith(ENV_PREFIX) and "__" in name[len(ENV_PREFIX) :]


def apply_env_overrides(
    raw: dict[str, Any],
    env: Mapping[str, str],
    problems: list[str],
    origins: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``raw`` with the environment's overrides merged in. ``origins`` receives, per
    dotted key path set, the variable that set it (so problems can name it)."""
    merged: dict[str, Any] = json.loads(json.dumps(raw))  # deep copy of plain TOML data
    for name, text in sorted(env.items()):
        if not is_override(name):
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        if not all(path):
            problems.append(f"{name}: malformed environment override name")
            continue
        node = merged
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(f"{name}: {'.'.join(path)} is not a table")
                break
            node = child
        else:
            node[path[-1]] = _parse_env_value(text)
            if origins is not None:
                origins[".".join(path)] = name
    return merged


def _name_variables(problems: list[str], origins: Mapping[str, str]) -> list[str]:
    """Each problem about a key an environment variable set, saying which variable:
    the operator looking at the TOML file would never find it there."""
    out = []
    for problem in problems:
        key = problem.split(": ", 1)[0]
        names = [
            var
            for path, var in origins.items()
            if key == path or key.startswith((path + ".", path + "[")) or path.startswith(key + ".")
        ]
        out.append(f"{problem} (from {', '.join(sorted(names))})" if names else problem)
    return out


def _resolve_file_secrets(node: Any, path: str, base_dir: Path, problems: list[str]) -> Any:
    """Replace every ``x_file = "path"`` with ``x = <file contents>``."""
    if isinstance(node, list):
        return [
            _resolve_file_secrets(v, f"{path}[{i}]", base_dir, problems) for i, v in enumerate(node)
        ]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        full = f"{path}.{key}" if path else key
        if key.endswith("_file") and isinstance(value, str) and key != "session_policy_file":
            target = key[: -len("_file")]
            if target in node:
                problems.append(f"{full}: set either {target} or {key}, not both")
                continue
            file_path = (base_dir / value).expanduser()
            try:
                out[target] = file_path.read_text().rstrip("\r\n")
            except OSError as exc:
                problems.append(f"{full}: cannot read {file_path}: {exc.strerror}")
            continue
        out[key] = _resolve_file_secrets(value, full, base_dir, problems)
    return out


# --------------------------------------------------------------------------- sections


def _server(r: _Reader) -> ServerSettings:
    s = ServerSettings(
        public_url=r.url("public_url", "http://127.0.0.1:8000").rstrip("/"),
        max_body_bytes=r.integer("max_body_bytes", 64 * 1024, lo=1024, hi=10 * 1024 * 1024),
        trusted_proxies=r.integer("trusted_proxies", 0, lo=0, hi=10),
        log_level=r.text("log_level", "info").lower(),
        explain_denials=r.flag("explain_denials", True),
        worker_class=r.text("worker_class", "gthread"),
    )
    if s.log_level not in {"debug", "info", "warning", "error"}:
        r.problem("log_level", "must be debug, info, warning or error")
    if s.worker_class not in WORKER_CLASSES:
        r.problem("worker_class", f"must be one of {', '.join(sorted(WORKER_CLASSES))}")
    r.finish()
    return s


def _redis(r: _Reader, base: Path) -> RedisSettings:
    mode = r.text("mode", "standalone")
    if mode not in {"standalone", "sentinel", "cluster"}:
        r.problem("mode", "must be standalone, sentinel or cluster")
    sentinels: list[tuple[str, int]] = []
    for item in r.str_list("sentinels", ()):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            r.problem("sentinels", f"entries must be host:port, got {item!r}")
        else:
            sentinels.append((host, int(port)))
    url = r.text("url", "redis://127.0.0.1:6379/0")
    scheme = urlsplit(url).scheme if isinstance(url, str) else ""
    if isinstance(url, str) and scheme not in {"redis", "rediss", "unix"}:
        r.problem("url", "must be a redis://, rediss:// or unix:// URL")
    if isinstance(url, str) and urlsplit(url).password:
        # The URL is shown in messages and settings dumps; a secret must not be.
        r.problem("url", "must not carry a password: set redis.password or redis.password_file")
    tls = r.flag("tls", scheme == "rediss")
    if mode != "sentinel" and isinstance(tls, bool) and tls != (scheme == "rediss"):
        # redis-py takes TLS from the URL scheme: a mismatch would silently win one way.
        r.problem("tls", "must match the URL: rediss:// for TLS, redis:// without")
    paths = {name: _readable_path(r, name, base) for name in _TLS_PATHS}
    if not tls and any(paths.values()):
        r.problem("tls", "tls_*_path is set but TLS is off (set tls = true or use rediss://)")
    if bool(paths["tls_cert_path"]) != bool(paths["tls_key_path"]):
        r.problem("tls_cert_path", "a client certificate needs both tls_cert_path and tls_key_path")
    prefix = r.text("key_prefix", "broker:")
    if isinstance(prefix, str) and ("{" in prefix or "}" in prefix):
        # A hash tag in the prefix would put every key in one Cluster slot, and beat the
        # per-identity tags the store adds (Redis hashes the first {...} only).
        r.problem("key_prefix", "must not contain { or } (Redis Cluster hash tags)")
    s = RedisSettings(
        url=url,
        key_prefix=prefix,
        socket_timeout_seconds=r.number("socket_timeout_seconds", 2.0, lo=0.05, hi=60),
        mode=mode,
        sentinels=tuple(sentinels),
        sentinel_service=r.text("sentinel_service", "", allow_empty=True),
        username=r.opt_str("username"),
        password=r.opt_str("password"),
        sentinel_username=r.opt_str("sentinel_username"),
        sentinel_password=r.opt_str("sentinel_password"),
        tls=tls,
        **paths,
    )
    if mode == "sentinel" and (not sentinels or not s.sentinel_service):
        r.problem("mode", "sentinel mode needs sentinels and sentinel_service")
    if mode != "sentinel" and (s.sentinel_username or s.sentinel_password):
        r.problem("sentinel_password", "is only used in sentinel mode")
    r.finish()
    return s


# Paths, not ``*_file`` keys: redis-py's TLS needs file names, and ``*_file`` keys are
# read into the value of their key (secrets from files).
_TLS_PATHS = ("tls_ca_path", "tls_cert_path", "tls_key_path")


def _readable_path(r: _Reader, name: str, base: Path) -> str | None:
    """An absolute path to a readable file (relative ones from the config's folder)."""
    value = r.opt_str(name)
    if value is None:
        return None
    path = (base / value).expanduser()
    try:
        path.open("rb").close()
    except OSError as exc:
        r.problem(name, f"cannot read {path}: {exc.strerror}")
        return None
    return str(path)


def _security(r: _Reader) -> SecuritySettings:
    identity_key = r.text("identity_key")
    # A key file may hold several keys, one per line (newest first) for rotation.
    keys = tuple(k for entry in r.str_list("encryption_keys", nonempty=True) for k in entry.split())
    decoded = [_secret_bytes(k) for k in keys]
    for i, k in enumerate(decoded):
        if len(k) != 32:
            r.problem("encryption_keys", f"entry {i} must be 32 bytes (base64), got {len(k)} bytes")
    id_key = _secret_bytes(identity_key) if isinstance(identity_key, str) else b""
    if isinstance(identity_key, str) and identity_key and len(id_key) < 16:
        r.problem("identity_key", "must be at least 16 bytes")
    r.finish()
    return SecuritySettings(identity_key=id_key, encryption_keys=tuple(decoded))


def _sts(r: _Reader) -> STSSettings:
    s = STSSettings(
        region=r.text("region", "us-east-1"),
        endpoint_url=r.opt_url("endpoint_url"),
        timeout_seconds=r.number("timeout_seconds", 5.0, lo=0.1, hi=60),
        max_attempts=r.integer("max_attempts", 3, lo=1, hi=10),
    )
    r.finish()
    return s


def _cache(r: _Reader) -> CacheSettings:
    s = CacheSettings(
        enabled=r.flag("enabled", True),
        safety_margin_seconds=r.integer("safety_margin_seconds", 300, lo=0, hi=3600),
        lock_timeout_seconds=r.number("lock_timeout_seconds", 15.0, lo=1, hi=120),
        lock_wait_seconds=r.number("lock_wait_seconds", 20.0, lo=1, hi=120),
        local_seconds=r.integer("local_seconds", 30, lo=0, hi=300),
        replay=r.flag("replay", True),
    )
    r.finish()
    return s


def _issuer(r: _Reader, base_dir: Path) -> IssuerSettings:
    # Loaded on demand: every broker command, credential-process included, reads the
    # settings, and only issuer key files need cryptography.
    from cryptography.hazmat.primitives.asymmetric import ec, rsa  # noqa: PLC0415
    from cryptography.hazmat.primitives.serialization import (  # noqa: PLC0415
        load_pem_private_key,
    )

    pems: list[bytes] = []
    for name in r.str_list("key_files", ()):
        path = (base_dir / name).expanduser()
        try:
            pem = path.read_bytes()
            key = load_pem_private_key(pem, password=None)
        except OSError as exc:
            r.problem("key_files", f"cannot read {path}: {exc.strerror}")
            continue
        except (ValueError, TypeError):
            r.problem("key_files", f"{path} is not an unencrypted PEM private key")
            continue
        if (isinstance(key, rsa.RSAPrivateKey) and key.key_size >= 2048) or (
            isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
        ):
            pems.append(pem)
        else:
            # What RS256 and ES256 sign with; IAM accepts nothing weaker.
            r.problem("key_files", f"{path} must hold an RSA key of 2048+ bits or a P-256 key")
    algorithm = r.text("algorithm", "RS256")
    if algorithm not in {"RS256", "ES256"}:
        r.problem("algorithm", f"must be RS256 or ES256, got {algorithm!r}")
    s = IssuerSettings(
        audience=r.text("audience", "sts.amazonaws.com"),
        algorithm=algorithm if algorithm in {"RS256", "ES256"} else "RS256",
        token_seconds=r.integer(
            "token_seconds", ISSUER_MAX_TOKEN_SECONDS, lo=60, hi=ISSUER_MAX_TOKEN_SECONDS
        ),
        key_pems=tuple(pems),
        rotate_after_seconds=r.integer("rotate_after_seconds", 30 * 86400, lo=3600, hi=366 * 86400),
        publish_ahead_seconds=r.integer("publish_ahead_seconds", 3600, lo=0, hi=7 * 86400),
    )
    r.finish()
    return s


def _guest(r: _Reader, base_dir: Path, rules: Iterable[RuleSettings]) -> GuestSettings:
    enabled = r.flag("enabled", False)
    role = r.opt_str("role_arn")
    if role is not None and not ROLE_ARN_RE.match(role):
        r.problem("role_arn", f"{role!r} is not an IAM role ARN")
    if enabled and role is None:
        r.problem("role_arn", "guest access needs the role guests get")
    if role is not None and any(role in rule.roles for rule in rules):
        # The guest role's trust policy admits unauthenticated tokens (amr
        # "unauthenticated"): a role people sign in for must not be reachable that way.
        r.problem("role_arn", "must not be a role that rules grant to signed-in identities")
    s = GuestSettings(
        enabled=enabled,
        role_arn=role,
        duration_seconds=r.integer("duration_seconds", 900, lo=STS_MIN_DURATION, hi=3600),
        session_policy=_session_policy(r, base_dir),
        new_per_ip_per_hour=r.integer("new_per_ip_per_hour", 10, lo=1, hi=10_000),
        per_ip_per_minute=r.integer("per_ip_per_minute", 20, lo=1, hi=10_000),
        token_days=r.integer("token_days", 90, lo=1, hi=3650),
    )
    r.finish()
    if s.session_policy is not None:
        where = r.key("session_policy")
        r.problems.extend(f"{where}: {p}" for p in check_policy_template(s.session_policy))
    return s


def _upstream(r: _Reader) -> UpstreamSettings:
    s = UpstreamSettings(
        budget_seconds=r.number("budget_seconds", 10.0, lo=0.5, hi=MAX_UPSTREAM_BUDGET_SECONDS),
    )
    r.finish()
    return s


def _identity(r: _Reader) -> IdentitySettings:
    s = IdentitySettings(region=r.text("region", "us-east-1"))
    if isinstance(s.region, str) and not IDENTITY_REGION_RE.fullmatch(s.region):
        r.problem("region", "must be 1 to 27 of A-Z a-z 0-9 _ + = , . @ - (like us-east-1)")
    r.finish()
    return s


def _rate_limit(r: _Reader) -> RateLimitSettings:
    s = RateLimitSettings(
        per_ip_per_minute=r.integer("per_ip_per_minute", 600, lo=0, hi=10**7),
        per_identity_per_minute=r.integer("per_identity_per_minute", 120, lo=0, hi=10**7),
    )
    r.finish()
    return s


def _web(r: _Reader) -> WebSettings:
    cookie = r.text("session_cookie", "broker_session")
    secure = r.flag("cookie_secure", True)
    if isinstance(cookie, str) and not COOKIE_NAME_RE.fullmatch(cookie):
        r.problem("session_cookie", "must be 1-64 letters, digits, '_' or '-'")
    elif isinstance(cookie, str) and cookie.startswith(("__Host-", "__Secure-")) and not secure:
        # Browsers drop prefixed cookies that are not Secure: nobody could sign in.
        r.problem("session_cookie", "a __Host-/__Secure- name needs cookie_secure = true")
    s = WebSettings(
        session_cookie=cookie,
        cookie_secure=secure,
        session_idle_seconds=r.integer("session_idle_seconds", 3600, lo=60, hi=7 * 86400),
        session_absolute_seconds=r.integer(
            "session_absolute_seconds", 43200, lo=300, hi=30 * 86400
        ),
        login_state_ttl_seconds=r.integer("login_state_ttl_seconds", 600, lo=30, hi=3600),
    )
    r.finish()
    return s


def _cli(r: _Reader) -> CLISettings:
    s = CLISettings(
        enabled=r.flag("enabled", True),
        session_idle_seconds=r.integer("session_idle_seconds", 86400, lo=300, hi=30 * 86400),
        session_absolute_seconds=r.integer(
            "session_absolute_seconds", 7 * 86400, lo=300, hi=90 * 86400
        ),
        login_ttl_seconds=r.integer("login_ttl_seconds", 600, lo=60, hi=1800),
        device_poll_seconds=r.integer("device_poll_seconds", 5, lo=1, hi=60),
    )
    r.finish()
    return s


def _console(r: _Reader) -> ConsoleSettings:
    s = ConsoleSettings(
        federation_url=r.opt_url("federation_url"),
        timeout_seconds=r.number("timeout_seconds", 5.0, lo=0.1, hi=60),
    )
    r.finish()
    return s


# An admin token guards what rules and policies would do for anyone: it must not be
# guessable, and 32 characters of base64 or hex are 128+ bits.
ADMIN_TOKEN_MIN_CHARS = 32


def _admin(r: _Reader) -> AdminSettings:
    token = r.opt_str("token")
    if token is not None and len(token.strip()) < ADMIN_TOKEN_MIN_CHARS:
        r.problem("token", f"must be at least {ADMIN_TOKEN_MIN_CHARS} characters")
    r.finish()
    return AdminSettings(token=token.strip() if token else None)


# A metrics token is a password a scraper sends on every request: long enough that it
# cannot be guessed online.
METRICS_TOKEN_MIN_CHARS = 32
LOOPBACK = "127.0.0.1"


def _listen_address(r: _Reader, name: str) -> tuple[str, int] | None:
    """``host:port``, ``[v6]:port``, ``:port`` or a bare port; without a host the
    listener is loopback-only, so metrics never reach the network by accident."""
    value = r.raw(name)
    if value is _MISSING:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        r.problem(name, "must be host:port or a port number")
        return None
    host, _, port = str(value).rpartition(":")
    host = host.strip("[]") or LOOPBACK
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        r.problem(name, f"must be host:port with a port from 1 to 65535, got {value!r}")
        return None
    if any(c.isspace() or c in "/@?#" for c in host):
        r.problem(name, f"is not a host name or address: {host!r}")
        return None
    return host, int(port)


def _metrics(r: _Reader) -> MetricsSettings:
    token = r.opt_str("token")
    if token is not None and len(token) < METRICS_TOKEN_MIN_CHARS:
        r.problem("token", f"must be at least {METRICS_TOKEN_MIN_CHARS} characters")
    s = MetricsSettings(token=token, listen=_listen_address(r, "listen"))
    r.finish()
    return s


def _developer_jwks(r: _Reader) -> Mapping[str, Any] | None:
    """A developer provider's keys: ``jwks_file`` (read into ``jwks`` by the loader) or
    inline ``jwks``, checked now so a bad file stops the start."""
    # On demand: pyjwt imports ssl, which gunicorn's master (it reads these settings)
    # must not load before a gevent worker has patched it.
    from broker.jwk import MalformedDocument, parse_key_set  # noqa: PLC0415

    raw = r.raw("jwks")
    if raw is _MISSING:
        r.problem("jwks_file", "a developer provider needs its backend's keys (a JWKS file)")
        return None
    try:
        document = json.loads(raw) if isinstance(raw, str) else raw
        keys = document.get("keys") if isinstance(document, dict) else None
        if isinstance(keys, list) and any(
            isinstance(jwk, dict) and {"d", "p", "q", "dp", "dq", "qi", "k"} & set(jwk)
            for jwk in keys
        ):
            # The broker verifies; the backend alone must hold the private half.
            r.problem("jwks_file", "holds a private or symmetric key: publish public keys only")
            return None
        parse_key_set(document)
    except (ValueError, MalformedDocument) as exc:
        r.problem("jwks_file", f"is not a usable JSON Web Key Set: {exc}")
        return None
    return cast(Mapping[str, Any], document)


def _oidc_provider(name: str, kind: str, r: _Reader) -> OIDCProviderSettings:
    google = kind == "google"
    developer = kind == "developer"
    static_jwks = _developer_jwks(r) if developer else None
    if developer:
        for key in ("jwks_url", "discovery_url", "client_secret"):
            if r.raw(key) is not _MISSING:
                r.problem(key, "a developer provider takes its keys from jwks_file, API only")
    issuer = r.opt_url("issuer")
    issuers = r.str_list("issuers", GOOGLE_ISSUERS if google else ())
    if issuer:
        issuers = (issuer, *[i for i in issuers if i != issuer])
    discovery_url = r.opt_url("discovery_url")
    jwks_url = r.opt_url("jwks_url")
    if google:
        jwks_url = jwks_url or GOOGLE_JWKS_URL
        discovery_url = discovery_url or GOOGLE_DISCOVERY_URL
    elif not issuers:
        r.problem("issuer", "is required for an oidc provider")
    elif not jwks_url and not discovery_url and not developer:
        discovery_url = issuers[0].rstrip("/") + "/.well-known/openid-configuration"
    algorithms = r.str_list("algorithms", ("RS256",), nonempty=True)
    for alg in algorithms:
        # Only asymmetric algorithms: an HMAC "signature" keyed with a public key is
        # forgeable by anyone, and "none" is no signature at all.
        if alg not in {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384"}:
            r.problem("algorithms", f"{alg!r} is not an allowed asymmetric algorithm")
    s = OIDCProviderSettings(
        name=name,
        type="google" if google else "developer" if developer else "oidc",
        display_name=r.text("display_name", "Google" if google else name),
        issuers=issuers,
        client_ids=r.str_list("client_ids", nonempty=True),
        discovery_url=discovery_url,
        jwks_url=jwks_url,
        algorithms=algorithms,
        leeway_seconds=r.integer("leeway_seconds", DEFAULT_LEEWAY_SECONDS, lo=0, hi=300),
        jwks_cache_seconds=r.integer("jwks_cache_seconds", 3600, lo=10, hi=86400),
        jwks_refresh_cooldown_seconds=r.integer("jwks_refresh_cooldown_seconds", 30, lo=0, hi=3600),
        jwks_refresh_burst=r.integer("jwks_refresh_burst", 3, lo=1, hi=20),
        timeout_seconds=r.number("timeout_seconds", 5.0, lo=0.1, hi=60),
        require_nonce=r.flag("require_nonce", False),
        client_secret=r.opt_str("client_secret"),
        scopes=r.str_list("scopes", ("openid", "email", "profile")),
        static_jwks=static_jwks,
    )
    r.finish()
    return s


def _amazon_provider(name: str, r: _Reader) -> AmazonProviderSettings:
    s = AmazonProviderSettings(
        name=name,
        type="amazon",
        display_name=r.text("display_name", "Login with Amazon"),
        client_ids=r.str_list("client_ids", nonempty=True),
        api_url=r.url("api_url", "https://api.amazon.com").rstrip("/"),
        timeout_seconds=r.number("timeout_seconds", 5.0, lo=0.1, hi=60),
        client_secret=r.opt_str("client_secret"),
        authorize_url=r.url("authorize_url", "https://www.amazon.com/ap/oa"),
        scopes=r.str_list("scopes", ("profile",)),
    )
    r.finish()
    return s


def _facebook_provider(name: str, r: _Reader) -> FacebookProviderSettings:
    s = FacebookProviderSettings(
        name=name,
        type="facebook",
        display_name=r.text("display_name", "Facebook"),
        app_id=r.text("app_id"),
        app_secret=r.text("app_secret"),
        graph_url=r.url("graph_url", "https://graph.facebook.com").rstrip("/"),
        graph_version=r.text("graph_version", "v19.0"),
        timeout_seconds=r.number("timeout_seconds", 5.0, lo=0.1, hi=60),
        limited_login=r.flag("limited_login", False),
        limited_login_issuer=r.url("limited_login_issuer", "https://www.facebook.com"),
        limited_login_jwks_url=r.url(
            "limited_login_jwks_url",
            "https://limited.facebook.com/.well-known/oauth/openid/jwks/",
        ),
        limited_login_sts_ready=r.flag("limited_login_sts_ready", False),
        dialog_url=r.url("dialog_url", "https://www.facebook.com/v19.0/dialog/oauth"),
        scopes=r.str_list("scopes", ("public_profile", "email")),
    )
    r.finish()
    return s


def _providers(r: _Reader) -> dict[str, ProviderSettings]:
    out: dict[str, ProviderSettings] = {}
    for name in r.data:
        sub = r.table(name)
        if not PROVIDER_NAME_RE.match(name):
            r.problem(name, "provider names are lowercase letters, digits, - and _")
        kind = sub.text("type", name if name in {"google", "amazon", "facebook"} else "oidc")
        if kind in {"oidc", "google", "developer"}:
            out[name] = _oidc_provider(name, kind, sub)
        elif kind == "amazon":
            out[name] = _amazon_provider(name, sub)
        elif kind == "facebook":
            out[name] = _facebook_provider(name, sub)
        else:
            sub.problem("type", "must be one of oidc, google, developer, amazon, facebook")
    return out


def _session_policy(r: _Reader, base_dir: Path) -> Mapping[str, Any] | None:
    inline = r.raw("session_policy")
    from_file = r.raw("session_policy_file")
    if inline is not _MISSING and from_file is not _MISSING:
        r.problem("session_policy", "set either session_policy or session_policy_file")
        return None
    if from_file is not _MISSING:
        if not isinstance(from_file, str):
            r.problem("session_policy_file", "must be a path")
            return None
        try:
            inline = (base_dir / from_file).read_text()
        except OSError as exc:
            r.problem("session_policy_file", f"cannot read {from_file}: {exc.strerror}")
            return None
    if inline is _MISSING:
        return None
    if isinstance(inline, str):
        try:
            inline = json.loads(inline)
        except json.JSONDecodeError as exc:
            r.problem("session_policy", f"is not valid JSON: {exc.msg} at line {exc.lineno}")
            return None
    if not isinstance(inline, Mapping) or "Statement" not in inline:
        r.problem("session_policy", "must be an IAM policy object with a Statement")
        return None
    return cast(Mapping[str, Any], inline)


def _token_fields(
    r: _Reader,
) -> tuple[StsToken, tuple[tuple[str, TagSource], ...], tuple[str, ...], str | None]:
    """A rule's sts_token, principal_tags, transitive_tag_keys and source_identity_claim."""
    sts_token = r.text("sts_token", "provider")
    if sts_token not in STS_TOKENS:
        r.problem("sts_token", f"must be one of {', '.join(STS_TOKENS)}, got {sts_token!r}")
        sts_token = "provider"  # noqa: S105 - a kind of token, not a secret
    principal_tags = _principal_tags(r)
    transitive = r.str_list("transitive_tag_keys", ())
    tag_keys = {k for k, _ in principal_tags}
    for key in transitive:
        if key not in tag_keys:
            r.problem("transitive_tag_keys", f"{key!r} is not one of the rule's principal_tags")
    source_identity_claim = r.opt_str("source_identity_claim")
    if (principal_tags or source_identity_claim) and sts_token != "broker":  # noqa: S105 - a kind of token, not a secret
        # Only the broker's own token can carry tags and a source identity: the
        # provider's token says what the provider put in it, nothing more.
        r.problem(
            "sts_token",
            'session tags and source identity need sts_token = "broker" (the broker\'s '
            "own token carries them; the provider's cannot)",
        )
    return sts_token, principal_tags, transitive, source_identity_claim


def _principal_tags(r: _Reader) -> tuple[tuple[str, TagSource], ...]:
    """``principal_tags = { key = { claim = "dotted.path" } | { value = "fixed" } }``."""
    raw = r.raw("principal_tags")
    if raw is _MISSING:
        return ()
    if not isinstance(raw, Mapping):
        r.problem("principal_tags", "must be a table: KEY = { claim = ... } or { value = ... }")
        return ()
    out: list[tuple[str, TagSource]] = []
    seen: set[str] = set()
    for key, spec in raw.items():
        where = f"principal_tags.{key}"
        if (problem := tag_key_problem(key)) is not None:
            r.problem(where, problem)
            continue
        if key.lower() in seen:
            # STS compares tag keys without regard to case: two would be a duplicate.
            r.problem(where, "another tag key differs from it only in case")
            continue
        seen.add(key.lower())
        if not isinstance(spec, Mapping) or set(spec) not in ({"claim"}, {"value"}):
            r.problem(where, 'must be { claim = "NAME" } or { value = "TEXT" }')
            continue
        if "claim" in spec:
            if not isinstance(spec["claim"], str) or not spec["claim"].strip():
                r.problem(f"{where}.claim", "must be a non-empty claim name")
                continue
            out.append((key, TagSource(claim=spec["claim"])))
            continue
        value = spec["value"]
        if not isinstance(value, str):
            r.problem(f"{where}.value", "must be a string")
        elif len(value) > STS_MAX_TAG_VALUE_CHARS or not tag_text_ok(value):
            r.problem(
                f"{where}.value",
                f"tag values are at most {STS_MAX_TAG_VALUE_CHARS} letters, digits, "
                "spaces and _ . : / = + - @",
            )
        else:
            out.append((key, TagSource(value=value)))
    if len(raw) > STS_MAX_TAGS:
        r.problem("principal_tags", f"STS accepts at most {STS_MAX_TAGS} session tags")
    return tuple(out)


def _condition(r: _Reader) -> Condition | None:
    claim = r.text("claim")
    op = r.text("op")
    value = r.raw("value")
    r.finish()
    if op not in OPERATORS:
        r.problem("op", f"must be one of {', '.join(OPERATORS)}")
        return None
    if op == "in":
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            r.problem("value", "must be a non-empty list of strings for op 'in'")
            return None
        return Condition(claim=claim, op=op, value=tuple(value))
    if not isinstance(value, str) or not value:
        r.problem("value", f"must be a non-empty string for op {op!r}")
        return None
    return Condition(claim=claim, op=op, value=value)


def _rule(
    i: int, raw: Any, providers: Mapping[str, ProviderSettings], problems: list[str], base: Path
) -> RuleSettings | None:
    if not isinstance(raw, Mapping):
        problems.append(f"rules[{i}]: must be a table")
        return None
    r = _Reader(raw, f"rules[{i}]", problems)
    before = len(problems)
    name = r.text("name", f"rule-{i}")
    rule_providers = r.str_list("providers", nonempty=True)
    for p in rule_providers:
        if p not in providers:
            r.problem("providers", f"{p!r} is not a configured provider")
    conditions: list[Condition] = []
    raw_conditions = r.raw("conditions")
    if raw_conditions is _MISSING or not isinstance(raw_conditions, list) or not raw_conditions:
        # Vault refuses a role with no bound claims for the same reason: a rule that
        # matches everyone who can get a token from the provider is almost never meant.
        r.problem("conditions", "a rule needs at least one claim condition (no unbound rules)")
    else:
        for j, c in enumerate(raw_conditions):
            if not isinstance(c, Mapping):
                r.problem(f"conditions[{j}]", "must be a table")
                continue
            cond = _condition(_Reader(c, r.key(f"conditions[{j}]"), problems))
            if cond:
                conditions.append(cond)
    roles = r.str_list("roles", nonempty=True)
    for role in roles:
        if not ROLE_ARN_RE.match(role):
            r.problem("roles", f"{role!r} is not an IAM role ARN")
    policy_arns = r.str_list("policy_arns", ())
    for arn in policy_arns:
        if not POLICY_ARN_RE.match(arn):
            r.problem("policy_arns", f"{arn!r} is not an IAM policy ARN")
    if len(policy_arns) > STS_MAX_POLICY_ARNS:
        r.problem("policy_arns", f"STS accepts at most {STS_MAX_POLICY_ARNS} policy ARNs")
    sts_token, principal_tags, transitive, source_identity_claim = _token_fields(r)
    for p in rule_providers:
        kind = getattr(providers.get(p), "type", None)
        if kind == "developer" and sts_token != "broker":  # noqa: S105 - a kind of token
            # IAM has never heard of the operator's backend: only the broker's token,
            # vouching for the identity it verified, can reach STS.
            r.problem("sts_token", f'provider {p!r} is a developer provider: needs "broker"')
    max_duration = r.integer("max_duration_seconds", 3600, lo=STS_MIN_DURATION, hi=STS_MAX_DURATION)
    default_duration = r.integer(
        "default_duration_seconds",
        min(3600, max_duration) if isinstance(max_duration, int) else 3600,
        lo=STS_MIN_DURATION,
        hi=STS_MAX_DURATION,
    )
    if (
        isinstance(default_duration, int)
        and isinstance(max_duration, int)
        and default_duration > max_duration
    ):
        r.problem("default_duration_seconds", "must not exceed max_duration_seconds")
    rule = RuleSettings(
        name=name,
        providers=rule_providers,
        conditions=tuple(conditions),
        roles=roles,
        require_email_verified=r.flag("require_email_verified", False),
        require_mfa=r.flag("require_mfa", False),
        mfa_amr_values=r.str_list("mfa_amr_values", ("mfa", "otp", "hwk", "swk")),
        mfa_acr_values=r.str_list("mfa_acr_values", ()),
        default_duration_seconds=default_duration,
        max_duration_seconds=max_duration,
        session_policy=_session_policy(r, base),
        policy_arns=policy_arns,
        sts_token=sts_token,
        principal_tags=principal_tags,
        transitive_tag_keys=transitive,
        source_identity_claim=source_identity_claim,
    )
    r.finish()
    if rule.session_policy is not None and len(problems) == before:
        problems.extend(
            f"rules[{i}].session_policy: {p}" for p in check_policy_template(rule.session_policy)
        )
    if isinstance(raw.get("name"), str) and raw["name"]:
        # Operators know their rules by name, not by position in the file.
        prefix = f"rules[{i}]"
        for j in range(before, len(problems)):
            if problems[j].startswith(prefix):
                problems[j] += f" (in rule {raw['name']!r})"
    return rule if len(problems) == before else None


# --------------------------------------------------------------------------- entry points


def settings_from_mapping(
    raw: Mapping[str, Any],
    *,
    env: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
    source: str = "<mapping>",
) -> Settings:
    problems: list[str] = []
    base = base_dir or Path.cwd()
    origins: dict[str, str] = {}
    merged = apply_env_overrides(dict(raw), os.environ if env is None else env, problems, origins)
    merged = _resolve_file_secrets(merged, "", base, problems)
    # [metrics] changes nothing about credentials: rotating the scrape token must not
    # empty the credential cache.
    versioned = {k: v for k, v in merged.items() if k != "metrics"}
    version = hashlib.sha256(
        json.dumps(versioned, sort_keys=True, default=str).encode()
    ).hexdigest()[:16]

    top = _Reader(merged, "", problems)
    sections: dict[str, Callable[[_Reader], Any]] = {
        "server": _server,
        "redis": lambda r: _redis(r, base),
        "security": _security,
        "sts": _sts,
        "cache": _cache,
        "identity": _identity,
        "rate_limit": _rate_limit,
        "web": _web,
        "cli": _cli,
        "console": _console,
        "upstream": _upstream,
        "admin": _admin,
        "metrics": _metrics,
    }
    built = {name: fn(top.table(name)) for name, fn in sections.items()}
    issuer = _issuer(top.table("issuer"), base)
    providers = _providers(top.table("providers"))
    if not providers:
        problems.append("providers: configure at least one identity provider")
    raw_rules = top.raw("rules")
    rules: list[RuleSettings] = []
    if raw_rules is _MISSING or not isinstance(raw_rules, list) or not raw_rules:
        problems.append("rules: configure at least one [[rules]] entry (deny is the default)")
    else:
        for i, raw_rule in enumerate(raw_rules):
            rule = _rule(i, raw_rule, providers, problems, base)
            if rule:
                rules.append(rule)
        names = [r.get("name") for r in raw_rules if isinstance(r, Mapping)]
        for name in sorted({n for n in names if isinstance(n, str) and names.count(n) > 1}):
            # Explain, /v1/roles and the audit trail name rules: two with one name would
            # make every one of them ambiguous.
            problems.append(f"rules: more than one rule is named {name!r}")
    guest = _guest(top.table("guest"), base, rules)
    top.finish()
    upstream = built["upstream"]
    if isinstance(upstream, UpstreamSettings):
        for name, provider in providers.items():
            if provider.timeout_seconds > upstream.budget_seconds:
                # Not an error in itself, but the attempt would be cut at the budget:
                # say so instead of letting the operator believe the longer timeout.
                problems.append(
                    f"providers.{name}.timeout_seconds: {provider.timeout_seconds:g} is more "
                    f"than upstream.budget_seconds ({upstream.budget_seconds:g}), the most "
                    "a request may spend on a provider"
                )
    if problems:
        raise ConfigError(_name_variables(problems, origins))
    return Settings(
        **built,
        providers=providers,
        rules=tuple(rules),
        issuer=issuer,
        guest=guest,
        config_version=version,
        source=source,
    )


def redis_settings_from_mapping(raw: Mapping[str, Any], *, base_dir: Path) -> RedisSettings:
    """The ``[redis]`` section alone, checked exactly as in a full load (for tools and
    tests that talk to Redis only)."""
    problems: list[str] = []
    merged = _resolve_file_secrets(dict(raw), "redis", base_dir, problems)
    parsed = _redis(_Reader(merged, "redis", problems), base_dir)
    if problems:
        raise ConfigError(problems)
    return parsed


def load_settings(path: Path | str | None = None, env: Mapping[str, str] | None = None) -> Settings:
    environ = os.environ if env is None else env
    chosen = path or environ.get(CONFIG_ENV)
    if not chosen:
        raise ConfigError([f"no config file: pass --config FILE or set {CONFIG_ENV}"])
    file = Path(chosen)
    try:
        raw = tomllib.loads(file.read_text())
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{file}: not valid TOML: {exc}"]) from None
    return settings_from_mapping(raw, env=environ, base_dir=file.resolve().parent, source=str(file))
