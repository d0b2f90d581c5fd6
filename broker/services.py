"""The services object: every outside dependency, built once per app from settings.

Web handlers reach dependencies only through ``current_services()`` (stored in
``app.extensions``), which is also the seam where tests plug in local servers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import redis
from flask import current_app

from broker import guest, metrics, rules
from broker.credentials import CredentialService, sdk_min_left
from broker.errors import BrokerError, NotFound, RateLimited, UnknownProvider
from broker.http import Http
from broker.identity import Identity, IdentityIds, hypothetical_token
from broker.issuer import Issuer
from broker.memo import ExpiringCache
from broker.providers import build_providers
from broker.providers.base import IdentityProvider
from broker.rules import Grant
from broker.settings import RuleSettings, Settings
from broker.store import Sealer, Store, connect
from broker.sts import STS, BotocoreSTS, IssuedCredentials

audit_log = logging.getLogger("broker.audit")

EXTENSION_KEY = "broker"
# A finished answer is 2-3 KB; the replay saves only the cached exchange's own work
# (broker.web.exchange), so the hottest bodies are enough.
REPLAY_ENTRIES = 2_048


@dataclass(frozen=True, kw_only=True)
class Replay:
    """A finished 200 answer to ``POST /v1/credentials``, replayed byte for byte to an
    identical request (see broker.web.exchange)."""

    status: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    identity_id: str
    audit: Mapping[str, Any]


@dataclass(frozen=True, kw_only=True)
class Issued:
    identity: Identity
    grant: Grant
    credentials: IssuedCredentials

    @cached_property
    def audit(self) -> Mapping[str, Any]:
        """The audit trail entry for these credentials: who got what, under which rule.
        AccessKeyId is safe to log (CloudTrail records it too) and lets operators join
        our log with CloudTrail. Built once: the log line and a stored replay share it."""
        creds = self.credentials
        return {
            "event": "credentials_issued",
            "identity_id": self.identity.identity_id,
            "provider": self.identity.provider,
            "rule": self.grant.rule,
            "role_arn": self.grant.role_arn,
            "assumed_role_arn": creds.assumed_role_arn,
            "access_key_id": creds.access_key_id,
            "expiration": creds.expiration_text,
            "session_policy": self.grant.session_policy is not None,
        }


def metric_labels(settings: Settings) -> metrics.Labels:
    """The configured providers, rules and roles: the only values their labels take."""
    return metrics.Labels(
        providers=frozenset(settings.providers),
        rules=frozenset(r.name for r in settings.rules),
        roles=frozenset(arn for r in settings.rules for arn in r.roles),
    )


@dataclass(kw_only=True)
class Services:
    settings: Settings
    store: Store
    http: Http
    providers: Mapping[str, IdentityProvider]
    identity_ids: IdentityIds
    sts: STS
    credentials: CredentialService
    # The broker's own token signer (rules with sts_token = "broker"); build() makes one.
    issuer: Issuer | None = None
    # Clients built here (not handed in by the caller), closed with the services.
    owned: tuple[Callable[[], None], ...] = ()
    # Answers to repeated identical API requests, per worker (broker.web.exchange).
    replays: ExpiringCache[bytes, Replay] = field(
        default_factory=lambda: ExpiringCache(max_entries=0, clock=time.time)
    )
    # The values the metrics' provider, rule and role labels may take, from settings.
    labels: metrics.Labels = field(init=False)

    def __post_init__(self) -> None:
        self.labels = metric_labels(self.settings)

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        redis_client: redis.Redis | None = None,
        sts: STS | None = None,
    ) -> Services:
        store = Store(
            client=redis_client or connect(settings.redis),
            prefix=settings.redis.key_prefix,
            sealer=Sealer(settings.security.encryption_keys),
        )
        http = Http(budget_seconds=settings.upstream.budget_seconds)
        owned: tuple[Callable[[], None], ...] = ()
        issuer = Issuer(settings=settings, store=store)
        if sts is None:
            botocore_sts = BotocoreSTS(settings.sts)
            sts, owned = botocore_sts, (botocore_sts.close,)
        return cls(
            owned=owned,
            replays=ExpiringCache(
                max_entries=REPLAY_ENTRIES
                if settings.cache.enabled and settings.cache.replay and settings.cache.local_seconds
                else 0,
                clock=time.time,
                # Only a body that comes back is kept (see broker.memo): fresh tokens
                # never do, and each answer held is a few KB.
                second_sight=True,
            ),
            settings=settings,
            store=store,
            http=http,
            providers=build_providers(settings, http=http, store=store),
            identity_ids=IdentityIds(
                key=settings.security.identity_key, region=settings.identity.region
            ),
            sts=sts,
            issuer=issuer,
            credentials=CredentialService(
                sts=sts,
                store=store,
                settings=settings.cache,
                config_version=settings.config_version,
                issuer=issuer,
            ),
        )

    # -- the shared middle of every flow: verify -> identity -> rules -> credentials ----

    def provider(self, name: str) -> IdentityProvider:
        try:
            return self.providers[name]
        except KeyError:
            raise UnknownProvider(
                f"unknown provider; configured: {', '.join(sorted(self.providers))}"
            ) from None

    def identify(self, provider: str, token: str, *, nonce: str | None = None) -> Identity:
        try:
            verified = self.provider(provider).verify(token, nonce=nonce)
        except BrokerError as exc:
            metrics.authentication(self.labels, provider, exc)
            # For the audit event of a failed authentication (the error path writes
            # it): a provider name the caller made up is not worth recording.
            exc.about(provider=provider if provider in self.providers else None)
            raise
        metrics.authentication(self.labels, provider, None)
        return self.identity_ids.identify(verified)

    def _denials(self, identity: Identity) -> dict[str, Any]:
        """How a refusal is worded for this identity (``server.explain_denials``)."""
        provider = self.providers.get(identity.provider)
        return {
            "explain_denials": self.settings.server.explain_denials,
            "provider_label": provider.display_name if provider else identity.provider,
        }

    def matching_rule(self, identity: Identity) -> RuleSettings:
        """The rule that decides for ``identity``; NoMatchingRule, worded for the
        person, when none does."""
        return rules.matching_rule(self.settings.rules, identity, **self._denials(identity))

    def allowed_roles(self, identity: Identity) -> tuple[str, ...]:
        return self.matching_rule(identity).roles

    def explain(
        self,
        provider: str,
        claims: Mapping[str, Any],
        *,
        role_arn: str | None = None,
        duration_seconds: int | None = None,
    ) -> rules.Explanation:
        """The decision the rules would make for ``claims`` at ``provider``, rule by
        rule, with the grant it would produce. Nothing is minted, cached or limited."""
        self.provider(provider)  # UnknownProvider for a name that is not configured
        return explain_claims(
            self.settings,
            provider,
            claims,
            role_arn=role_arn,
            duration_seconds=duration_seconds,
            provider_label=self.providers[provider].display_name,
        )

    def issue(
        self,
        identity: Identity,
        *,
        role_arn: str | None = None,
        duration_seconds: int | None = None,
        self_renewing: bool = False,
    ) -> Issued:
        """``self_renewing``: the caller is an AWS SDK that renews credentials by itself
        (the CLI, the container endpoint); see ``credentials.sdk_min_left``."""
        grant = self.decide(identity, role_arn=role_arn, duration_seconds=duration_seconds)
        return self.mint(identity, grant, self_renewing=self_renewing)

    def decide(
        self,
        identity: Identity,
        *,
        role_arn: str | None = None,
        duration_seconds: int | None = None,
    ) -> Grant:
        """The rules' answer for this identity, with nothing minted yet.

        ``issue`` is ``decide`` then ``mint``; a door that must check something about the
        chosen role before credentials exist (the console: the role's partition decides
        which destinations and regions are valid) calls the two itself.
        """
        try:
            self.limit_identity(identity.identity_id)
            return rules.decide(
                self.settings.rules,
                identity,
                role_arn=role_arn,
                duration_seconds=duration_seconds,
                **self._denials(identity),
            )
        except BrokerError as exc:
            # A refusal is the outcome of this credential request: nothing gets minted.
            metrics.credentials(
                self.labels, provider=identity.provider, rule=None, role=role_arn, error=exc
            )
            # Denials (rules, the rate limit) are audited by the error path, which needs
            # to know whom they were about.
            exc.about(provider=identity.provider, identity_id=identity.identity_id)
            raise

    def mint(self, identity: Identity, grant: Grant, *, self_renewing: bool = False) -> Issued:
        """Credentials for a grant ``decide`` returned for this identity (cache or STS)."""
        min_left = sdk_min_left(grant.duration_seconds) if self_renewing else 0.0
        try:
            creds = self.credentials.get(identity, grant, min_left=min_left)
        except BrokerError as exc:
            metrics.credentials(
                self.labels,
                provider=identity.provider,
                rule=grant.rule,
                role=grant.role_arn,
                error=exc,
            )
            exc.about(provider=identity.provider, identity_id=identity.identity_id)
            raise
        metrics.credentials(
            self.labels, provider=identity.provider, rule=grant.rule, role=grant.role_arn
        )
        issued = Issued(identity=identity, grant=grant, credentials=creds)
        audit_log.info("credentials issued", extra={"audit": issued.audit})
        return issued

    def guest(self, address: str | None, guest_token: str | None) -> tuple[Issued, str, int]:
        """Credentials for a guest (``POST /v1/guest``, see broker.guest): the same guest
        again for a valid guest token, else a new one. Returns the credentials and a
        renewed guest token with its expiry. NotFound while guest access is off."""

        settings = self.settings.guest
        if not settings.enabled:
            raise NotFound("not found")
        where = address or "unknown"
        self._limit("guest-ip", where, settings.per_ip_per_minute)
        tokens = guest.GuestTokens(
            identity_key=self.settings.security.identity_key,
            lifetime_seconds=settings.token_days * 86400,
        )
        if guest_token is not None:
            subject = tokens.open(guest_token)
        else:
            # New guests cost an attacker nothing: an hourly budget per address keeps
            # one address from minting an unbounded number of identities.
            created = self.store.hit(self.store.key("rate", "guest-new", where), window=3600)
            if created > settings.new_per_ip_per_hour:
                raise RateLimited(
                    f"more than {settings.new_per_ip_per_hour} new guests an hour from "
                    "this address",
                    retry_after=3600,
                )
            subject = tokens.new_subject()
        renewed, expires = tokens.issue(subject)
        identity = guest.guest_identity(self.identity_ids, subject, expires_at=expires)
        try:
            self.limit_identity(identity.identity_id)
            grant = guest.guest_grant(settings, identity)
        except BrokerError as exc:
            exc.about(provider=identity.provider, identity_id=identity.identity_id)
            raise
        return self.mint(identity, grant), renewed, expires

    def limit_address(self, address: str | None) -> None:
        """The per-client-address limit (``rate_limit.per_ip_per_minute``)."""
        self._limit("ip", address or "unknown", self.settings.rate_limit.per_ip_per_minute)

    def limit_identity(self, identity_id: str) -> None:
        """The per-identity limit (``rate_limit.per_identity_per_minute``)."""
        try:
            self._limit("identity", identity_id, self.settings.rate_limit.per_identity_per_minute)
        except RateLimited as exc:
            exc.about(provider=None, identity_id=identity_id)  # a replay knows no more
            raise

    def _limit(self, kind: str, subject: str, per_minute: int) -> None:
        """Fixed one-minute window per subject, shared by every process through Redis."""
        if per_minute <= 0:
            return
        count = self.store.hit(self.store.key("rate", kind, subject), window=60)
        if count > per_minute:
            raise RateLimited(f"more than {per_minute} requests a minute", retry_after=60)

    def replay_until(self, issued: Issued) -> float:
        """How long an identical request may get this answer again without re-running
        the pipeline: no longer than a worker may keep credentials in memory, than the
        upstream token is valid, or than the credentials may be handed out."""
        return min(
            self.credentials.memory_until(issued.credentials),
            float(issued.identity.verified.expires_at),
        )

    def forget(self, identity_id: str) -> int:
        """Stop handing out this identity's cached credentials (sign-out)."""
        self.replays.clear()  # this worker's replays of anyone: simple and cheap
        return self.credentials.forget(identity_id)

    def close(self) -> None:
        for close in self.owned:
            close()
        self.http.close()
        self.store.client.close()


def explain_claims(
    settings: Settings,
    provider: str,
    claims: Mapping[str, Any],
    *,
    role_arn: str | None = None,
    duration_seconds: int | None = None,
    provider_label: str | None = None,
) -> rules.Explanation:
    """rules.explain for claims an operator supplies (``broker explain``, ``POST
    /v1/explain``): the identity id is the one the broker would derive for them."""
    ids = IdentityIds(key=settings.security.identity_key, region=settings.identity.region)
    identity = ids.identify(hypothetical_token(provider, claims))
    label = provider_label
    if label is None and provider in settings.providers:
        label = settings.providers[provider].display_name
    return rules.explain(
        settings.rules,
        identity,
        role_arn=role_arn,
        duration_seconds=duration_seconds,
        explain_denials=True,
        provider_label=label,
    )


def current_services() -> Services:
    services: Services = current_app.extensions[EXTENSION_KEY]
    return services
