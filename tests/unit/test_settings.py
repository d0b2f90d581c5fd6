"""Config validation through ``settings_from_mapping``: one row per mistake, every
problem reported at once and named by key, env overrides and secrets from files."""

from __future__ import annotations

import base64
import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from broker.identity import IdentityIds
from broker.policy import _SAFE_IDENTITY_ID_RE
from broker.settings import (
    GOOGLE_ISSUERS,
    GOOGLE_JWKS_URL,
    ConfigError,
    OIDCProviderSettings,
    Settings,
    settings_from_mapping,
)

KEY_A = base64.b64encode(b"a" * 32).decode()
KEY_B = base64.b64encode(b"b" * 32).decode()
KEY_33 = base64.b64encode(b"k" * 33).decode()
DEV = "arn:aws:iam::123456789012:role/Dev"

MINIMAL: dict[str, Any] = {
    "security": {"identity_key": KEY_A, "encryption_keys": [KEY_B]},
    "providers": {
        "corp": {
            "type": "oidc",
            "issuer": "https://idp.example",
            "client_ids": ["app"],
            "jwks_url": "https://idp.example/jwks",
        }
    },
    "rules": [
        {
            "name": "r",
            "providers": ["corp"],
            "conditions": [{"claim": "email", "op": "glob", "value": "*@example.com"}],
            "roles": [DEV],
        }
    ],
}

Mutation = Callable[[dict[str, Any]], Any]


def config(*changes: Mutation) -> dict[str, Any]:
    raw = copy.deepcopy(MINIMAL)
    for change in changes:
        change(raw)
    return raw


def load(
    raw: dict[str, Any], env: dict[str, str] | None = None, base_dir: Path | None = None
) -> Settings:
    # An explicit env keeps the developer's own BROKER_* variables out of the tests.
    return settings_from_mapping(raw, env=env or {}, base_dir=base_dir, source="test")


def problems(raw: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(raw, env)
    assert str(len(caught.value.problems)) in str(caught.value)
    return caught.value.problems


def rule0(raw: dict[str, Any]) -> dict[str, Any]:
    first: dict[str, Any] = raw["rules"][0]
    return first


# --------------------------------------------------------------------------- valid


def test_minimal_config_loads_with_defaults() -> None:
    settings = load(config())
    corp = settings.providers["corp"]
    assert isinstance(corp, OIDCProviderSettings)
    assert corp.issuers == ("https://idp.example",)
    assert corp.client_ids == ("app",)
    assert corp.algorithms == ("RS256",)
    assert settings.security.identity_key == b"a" * 32
    assert settings.security.encryption_keys == (b"b" * 32,)
    (rule,) = settings.rules
    assert rule.roles == (DEV,)
    assert rule.default_duration_seconds == 3600
    assert rule.max_duration_seconds == 3600
    assert rule.session_policy is None
    assert settings.redis.url == "redis://127.0.0.1:6379/0"
    assert len(settings.config_version) == 16


def test_config_version_follows_the_rules() -> None:
    one = load(config()).config_version
    assert load(config()).config_version == one
    changed = config(lambda c: rule0(c).update(roles=["arn:aws:iam::123456789012:role/Other"]))
    assert load(changed).config_version != one


def test_every_operator_and_rule_option_loads() -> None:
    raw = config(
        lambda c: rule0(c).update(
            conditions=[
                {"claim": "email", "op": "equals", "value": "a@example.com"},
                {"claim": "hd", "op": "not_equals", "value": "evil.test"},
                {"claim": "groups", "op": "contains", "value": "aws"},
                {"claim": "sub", "op": "starts_with", "value": "u-"},
                {"claim": "email", "op": "glob", "value": "*@example.com"},
                {"claim": "dept", "op": "in", "value": ["eng", "sre"]},
            ],
            require_email_verified=True,
            require_mfa=True,
            mfa_acr_values=["urn:mfa"],
            max_duration_seconds=43200,
            default_duration_seconds=900,
            policy_arns=[f"arn:aws:iam::aws:policy/P{i}" for i in range(10)],
            session_policy='{"Statement": [{"Effect": "Allow", "Action": "s3:*",'
            ' "Resource": "arn:aws:s3:::b/${identity_id}/*"}]}',
        )
    )
    (rule,) = load(raw).rules
    assert [c.op for c in rule.conditions] == [
        "equals",
        "not_equals",
        "contains",
        "starts_with",
        "glob",
        "in",
    ]
    assert rule.conditions[-1].value == ("eng", "sre")
    assert len(rule.policy_arns) == 10
    assert rule.session_policy is not None
    assert rule.require_mfa
    assert rule.mfa_acr_values == ("urn:mfa",)


# --------------------------------------------------------------------------- all at once


def test_every_problem_is_reported_at_once() -> None:
    raw = config(
        lambda c: c.update(bogus=1),
        lambda c: c["security"].update(encryption_keys=[base64.b64encode(b"x" * 16).decode()]),
        lambda c: rule0(c).update(
            providers=["corp", "nope"], roles=["Dev"], max_duration_seconds=50000
        ),
        lambda c: c["rules"].append({"name": "second", "providers": ["corp"], "roles": [DEV]}),
    )
    found = problems(raw)
    expected = [
        "bogus: unknown key",
        "security.encryption_keys: entry 0 must be 32 bytes",
        "rules[0].providers: 'nope' is not a configured provider",
        "rules[0].roles: 'Dev' is not an IAM role ARN",
        "rules[0].max_duration_seconds: must be between 900 and 43200",
        "rules[1].conditions: a rule needs at least one claim condition",
    ]
    for needle in expected:
        assert any(p.startswith(needle) for p in found), (needle, found)
    assert len(found) == len(expected), found


# --------------------------------------------------------------------------- unknown keys

UNKNOWN_KEYS: list[tuple[str, Mutation, str]] = [
    ("top level", lambda c: c.update(rulez=[]), "rulez: unknown key"),
    ("section", lambda c: c.update(redis={"colour": "red"}), "redis.colour: unknown key"),
    ("security", lambda c: c["security"].update(idenity_key="x"), "security.idenity_key"),
    (
        "provider",
        lambda c: c["providers"]["corp"].update(isuer="https://x.example"),
        "providers.corp.isuer: unknown key",
    ),
    ("rule", lambda c: rule0(c).update(rolez=[DEV]), "rules[0].rolez: unknown key"),
    (
        "condition",
        lambda c: rule0(c)["conditions"][0].update(vlaue="x"),
        "rules[0].conditions[0].vlaue: unknown key",
    ),
    (
        "misspelt requirement",
        lambda c: rule0(c).update(require_mfa_=True),
        "rules[0].require_mfa_: unknown key",
    ),
]


@pytest.mark.parametrize(
    ("mutation", "needle"), [row[1:] for row in UNKNOWN_KEYS], ids=[row[0] for row in UNKNOWN_KEYS]
)
def test_unknown_keys_are_refused(mutation: Mutation, needle: str) -> None:
    found = problems(config(mutation))
    assert any(p.startswith(needle) for p in found), found


# --------------------------------------------------------------------------- one mistake each


def policy_arns(n: int) -> list[str]:
    return [f"arn:aws:iam::123456789012:policy/P{i}" for i in range(n)]


REJECTED: list[tuple[str, Mutation, str]] = [
    (
        "no conditions",
        lambda c: rule0(c).update(conditions=[]),
        "rules[0].conditions: a rule needs at least one claim condition",
    ),
    (
        "conditions missing",
        lambda c: rule0(c).pop("conditions"),
        "rules[0].conditions: a rule needs at least one claim condition",
    ),
    (
        "conditions not a list",
        lambda c: rule0(c).update(conditions={"claim": "a", "op": "equals", "value": "b"}),
        "rules[0].conditions: a rule needs",
    ),
    (
        "unknown provider",
        lambda c: rule0(c).update(providers=["google"]),
        "rules[0].providers: 'google' is not a configured provider",
    ),
    ("no providers in rule", lambda c: rule0(c).update(providers=[]), "rules[0].providers"),
    (
        "role not an ARN",
        lambda c: rule0(c).update(roles=["Dev"]),
        "rules[0].roles: 'Dev' is not an IAM role ARN",
    ),
    (
        "short account id",
        lambda c: rule0(c).update(roles=["arn:aws:iam::1234:role/Dev"]),
        "rules[0].roles:",
    ),
    (
        "user ARN",
        lambda c: rule0(c).update(roles=["arn:aws:iam::123456789012:user/Dev"]),
        "rules[0].roles:",
    ),
    (
        "wildcard role",
        lambda c: rule0(c).update(roles=["arn:aws:iam::123456789012:role/*"]),
        "rules[0].roles:",
    ),
    ("no roles", lambda c: rule0(c).update(roles=[]), "rules[0].roles: must not be empty"),
    (
        "11 policy ARNs",
        lambda c: rule0(c).update(policy_arns=policy_arns(11)),
        "rules[0].policy_arns: STS accepts at most 10",
    ),
    (
        "bad policy ARN",
        lambda c: rule0(c).update(policy_arns=["ReadOnlyAccess"]),
        "rules[0].policy_arns: 'ReadOnlyAccess' is not an IAM policy ARN",
    ),
    (
        "max duration too short",
        lambda c: rule0(c).update(max_duration_seconds=899),
        "rules[0].max_duration_seconds: must be between 900 and 43200",
    ),
    (
        "max duration too long",
        lambda c: rule0(c).update(max_duration_seconds=43201),
        "rules[0].max_duration_seconds: must be between 900 and 43200",
    ),
    (
        "default duration too short",
        lambda c: rule0(c).update(default_duration_seconds=60),
        "rules[0].default_duration_seconds: must be between 900 and 43200",
    ),
    (
        "default over max",
        lambda c: rule0(c).update(default_duration_seconds=7200, max_duration_seconds=3600),
        "rules[0].default_duration_seconds: must not exceed max_duration_seconds",
    ),
    (
        "duration as text",
        lambda c: rule0(c).update(max_duration_seconds="3600"),
        "rules[0].max_duration_seconds: must be an integer",
    ),
    (
        "unknown operator",
        lambda c: rule0(c)["conditions"][0].update(op="regex"),
        "rules[0].conditions[0].op: must be one of",
    ),
    (
        "in with a string",
        lambda c: rule0(c)["conditions"][0].update(op="in", value="eng"),
        "rules[0].conditions[0].value: must be a non-empty list of strings",
    ),
    (
        "empty value",
        lambda c: rule0(c)["conditions"][0].update(value=""),
        "rules[0].conditions[0].value: must be a non-empty string",
    ),
    (
        "boolean value",
        lambda c: rule0(c)["conditions"][0].update(op="equals", value=True),
        "rules[0].conditions[0].value: must be a non-empty string",
    ),
    (
        "condition without claim",
        lambda c: rule0(c)["conditions"][0].pop("claim"),
        "rules[0].conditions[0].claim: is required",
    ),
    (
        "require flag as text",
        lambda c: rule0(c).update(require_mfa="yes"),
        "rules[0].require_mfa: must be true or false",
    ),
    (
        "cookie name with a space",
        lambda c: c.update(web={"session_cookie": "broker session"}),
        "web.session_cookie: must be 1-64 letters",
    ),
    (
        "cookie name with a semicolon",
        lambda c: c.update(web={"session_cookie": "s;Domain=evil.example"}),
        "web.session_cookie: must be 1-64 letters",
    ),
    (
        "empty cookie name",
        lambda c: c.update(web={"session_cookie": ""}),
        "web.session_cookie: must be 1-64 letters",
    ),
    (
        "__Host- cookie without Secure",
        lambda c: c.update(web={"session_cookie": "__Host-s", "cookie_secure": False}),
        "web.session_cookie: a __Host-/__Secure- name needs cookie_secure = true",
    ),
    (
        "__Secure- cookie without Secure",
        lambda c: c.update(web={"session_cookie": "__Secure-s", "cookie_secure": False}),
        "web.session_cookie: a __Host-/__Secure- name needs cookie_secure = true",
    ),
    ("no rules", lambda c: c.update(rules=[]), "rules: configure at least one"),
    ("rules missing", lambda c: c.pop("rules"), "rules: configure at least one"),
    ("no providers", lambda c: c.update(providers={}), "providers: configure at least one"),
    (
        "encryption key 16 bytes",
        lambda c: c["security"].update(encryption_keys=[base64.b64encode(b"k" * 16).decode()]),
        "security.encryption_keys: entry 0 must be 32 bytes (base64), got 16 bytes",
    ),
    (
        "second encryption key wrong",
        lambda c: c["security"].update(encryption_keys=[KEY_A, KEY_33]),
        "security.encryption_keys: entry 1 must be 32 bytes",
    ),
    (
        "no encryption keys",
        lambda c: c["security"].update(encryption_keys=[]),
        "security.encryption_keys: must not be empty",
    ),
    (
        "identity key too short",
        lambda c: c["security"].update(identity_key="short"),
        "security.identity_key: must be at least 16 bytes",
    ),
    (
        "identity key missing",
        lambda c: c["security"].pop("identity_key"),
        "security.identity_key: is required",
    ),
    (
        "identity region with a colon",
        lambda c: c.update(identity={"region": "us:east"}),
        "identity.region: must be 1 to 27 of",
    ),
    (
        "identity region too long for a policy value",
        lambda c: c.update(identity={"region": "r" * 28}),
        "identity.region: must be 1 to 27 of",
    ),
    (
        "identity region empty",
        lambda c: c.update(identity={"region": ""}),
        "identity.region: must be 1 to 27 of",
    ),
    (
        "HMAC algorithm",
        lambda c: c["providers"]["corp"].update(algorithms=["HS256"]),
        "providers.corp.algorithms: 'HS256' is not an allowed asymmetric algorithm",
    ),
    (
        "oidc without issuer",
        lambda c: c["providers"]["corp"].pop("issuer"),
        "providers.corp.issuer: is required for an oidc provider",
    ),
    (
        "unknown provider type",
        lambda c: c["providers"]["corp"].update(type="saml"),
        "providers.corp.type: must be one of",
    ),
    (
        "redis URL scheme",
        lambda c: c.update(redis={"url": "http://cache"}),
        "redis.url: must be a redis://",
    ),
    (
        "session policy not JSON",
        lambda c: rule0(c).update(session_policy="{not json"),
        "rules[0].session_policy: is not valid JSON",
    ),
    (
        "session policy without Statement",
        lambda c: rule0(c).update(session_policy={"Version": "2012-10-17"}),
        "rules[0].session_policy: must be an IAM policy object with a Statement",
    ),
    (
        "unknown placeholder",
        lambda c: rule0(c).update(
            session_policy={"Statement": [{"Effect": "Allow", "Resource": "a/${foo}"}]}
        ),
        "rules[0].session_policy: Statement[0].Resource: unknown placeholder ${foo}",
    ),
    (
        "IAM policy variable",
        lambda c: rule0(c).update(
            session_policy={"Statement": [{"Effect": "Allow", "Resource": "a/${aws:userid}"}]}
        ),
        "rules[0].session_policy: Statement[0].Resource: unknown placeholder ${aws:userid}",
    ),
    (
        "placeholder in key",
        lambda c: rule0(c).update(
            session_policy={"Statement": [{"Effect": "Allow", "${sub}": "x"}]}
        ),
        "rules[0].session_policy: Statement[0].${sub}: placeholders are not allowed",
    ),
    (
        "oversize session policy",
        lambda c: rule0(c).update(
            session_policy={"Statement": [{"Effect": "Allow", "Resource": "${email}" * 40}]}
        ),
        "rules[0].session_policy: with the longest allowed identity values",
    ),
]


@pytest.mark.parametrize(
    ("mutation", "needle"), [row[1:] for row in REJECTED], ids=[row[0] for row in REJECTED]
)
def test_mistakes_are_refused_naming_the_key(mutation: Mutation, needle: str) -> None:
    found = problems(config(mutation))
    assert any(p.startswith(needle) for p in found), found


# --------------------------------------------------------------------------- environment


ENV_CASES: list[tuple[dict[str, str], Callable[[Settings], Any], Any]] = [
    ({"BROKER_REDIS__URL": "redis://cache:6380/1"}, lambda s: s.redis.url, "redis://cache:6380/1"),
    (
        {"BROKER_PROVIDERS__CORP__CLIENT_IDS": '["a","b"]'},
        lambda s: vars(s.providers["corp"])["client_ids"],
        ("a", "b"),
    ),
    ({"BROKER_STS__TIMEOUT_SECONDS": "2.5"}, lambda s: s.sts.timeout_seconds, 2.5),
    ({"BROKER_STS__MAX_ATTEMPTS": "5"}, lambda s: s.sts.max_attempts, 5),
    ({"BROKER_CACHE__ENABLED": "false"}, lambda s: s.cache.enabled, False),
    ({"BROKER_STS__REGION": "eu-west-1"}, lambda s: s.sts.region, "eu-west-1"),
    (
        {"BROKER_SERVER__PUBLIC_URL": "https://broker.example.com/"},
        lambda s: s.server.public_url,
        "https://broker.example.com",
    ),
    ({"BROKER_SECURITY__IDENTITY_KEY": KEY_B}, lambda s: s.security.identity_key, b"b" * 32),
    # not ours: ignored
    ({"REDIS_URL": "redis://elsewhere:1/0"}, lambda s: s.redis.url, "redis://127.0.0.1:6379/0"),
    ({"BROKER_CONFIG": "/etc/broker.toml"}, lambda s: s.redis.url, "redis://127.0.0.1:6379/0"),
]


@pytest.mark.parametrize(("env", "read", "expected"), ENV_CASES)
def test_env_overrides_apply(
    env: dict[str, str], read: Callable[[Settings], Any], expected: Any
) -> None:
    assert read(load(config(), env)) == expected


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"BROKER_REDIS__COLOUR": "red"}, "redis.colour: unknown key"),
        ({"BROKER_STS__MAX_ATTEMPTS": "many"}, "sts.max_attempts: must be an integer"),
        ({"BROKER_SECURITY____X": "1"}, "BROKER_SECURITY____X: malformed"),
        ({"BROKER_RULES__X": "1"}, "BROKER_RULES__X: rules.x is not a table"),
    ],
)
def test_env_override_mistakes_are_reported(env: dict[str, str], needle: str) -> None:
    found = problems(config(), env)
    assert any(p.startswith(needle) for p in found), found


def test_env_override_does_not_change_the_callers_mapping() -> None:
    raw = config()
    load(raw, {"BROKER_REDIS__URL": "redis://cache:6380/1"})
    assert raw == MINIMAL


# --------------------------------------------------------------------------- secrets in files


def test_secrets_from_files(tmp_path: Path) -> None:
    (tmp_path / "identity_key").write_text(KEY_A + "\n")
    # One key per line, newest first: rotation without a flush.
    (tmp_path / "encryption_keys").write_text(f"{KEY_B}\n{KEY_A}\n")
    (tmp_path / "client_secret").write_text("s3cret\n")

    def use_files(c: dict[str, Any]) -> None:
        c["security"] = {
            "identity_key_file": "identity_key",
            "encryption_keys_file": str(tmp_path / "encryption_keys"),
        }
        c["providers"]["corp"]["client_secret_file"] = "client_secret"

    settings = load(config(use_files), base_dir=tmp_path)
    assert settings.security.identity_key == b"a" * 32
    assert settings.security.encryption_keys == (b"b" * 32, b"a" * 32)
    corp = settings.providers["corp"]
    assert isinstance(corp, OIDCProviderSettings)
    assert corp.client_secret == "s3cret"
    assert "s3cret" not in repr(corp)


def test_secret_file_from_env(tmp_path: Path) -> None:
    (tmp_path / "key").write_text(KEY_B)
    raw = config(lambda c: c["security"].pop("identity_key"))
    settings = load(raw, {"BROKER_SECURITY__IDENTITY_KEY_FILE": str(tmp_path / "key")})
    assert settings.security.identity_key == b"b" * 32


def test_value_and_file_both_set_is_refused(tmp_path: Path) -> None:
    (tmp_path / "key").write_text(KEY_A)
    raw = config(lambda c: c["security"].update(identity_key_file=str(tmp_path / "key")))
    found = problems(raw)
    assert any(
        p.startswith(
            "security.identity_key_file: set either identity_key or identity_key_file, not both"
        )
        for p in found
    ), found


def test_unreadable_secret_file_is_reported(tmp_path: Path) -> None:
    raw = config(
        lambda c: c["security"].pop("identity_key"),
        lambda c: c["security"].update(identity_key_file=str(tmp_path / "missing")),
    )
    found = problems(raw)
    assert any(p.startswith("security.identity_key_file: cannot read") for p in found), found


def test_session_policy_from_file(tmp_path: Path) -> None:
    (tmp_path / "policy.json").write_text(
        '{"Statement": [{"Effect": "Allow", "Action": "s3:GetObject",'
        ' "Resource": "arn:aws:s3:::b/${identity_id}/*"}]}'
    )
    raw = config(lambda c: rule0(c).update(session_policy_file="policy.json"))
    (rule,) = load(raw, base_dir=tmp_path).rules
    assert rule.session_policy is not None
    assert rule.session_policy["Statement"][0]["Resource"] == "arn:aws:s3:::b/${identity_id}/*"


# --------------------------------------------------------------------------- provider presets


@pytest.mark.parametrize(
    "provider",
    [{"type": "google", "client_ids": ["web"]}, {"client_ids": ["web"]}],
    ids=["explicit type", "implied by name"],
)
def test_google_preset_fills_both_issuer_forms(provider: dict[str, Any]) -> None:
    def use_google(c: dict[str, Any]) -> None:
        c["providers"] = {"google": provider}
        rule0(c)["providers"] = ["google"]

    google = load(config(use_google)).providers["google"]
    assert isinstance(google, OIDCProviderSettings)
    assert google.type == "google"
    assert set(google.issuers) == set(GOOGLE_ISSUERS)
    assert set(google.issuers) == {"https://accounts.google.com", "accounts.google.com"}
    assert google.jwks_url == GOOGLE_JWKS_URL
    assert google.client_ids == ("web",)


def test_oidc_discovery_url_defaults_from_issuer() -> None:
    raw = config(lambda c: c["providers"]["corp"].pop("jwks_url"))
    corp = load(raw).providers["corp"]
    assert isinstance(corp, OIDCProviderSettings)
    assert corp.discovery_url == "https://idp.example/.well-known/openid-configuration"


# --------------------------------------------------------------------------- shipped examples


@pytest.mark.parametrize(
    "name", ["google.example.toml", "oidc.example.toml", "social.example.toml"]
)
def test_the_example_configs_load_once_their_secret_files_exist(
    name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from broker.cli import main

    for secret in ("identity_key", "encryption_keys"):
        (tmp_path / secret).write_text(base64.b64encode(bytes(range(32))).decode() + "\n")
        monkeypatch.setenv(f"BROKER_SECURITY__{secret.upper()}_FILE", str(tmp_path / secret))
    if name == "social.example.toml":
        (tmp_path / "app_secret").write_text("facebook-app-secret\n")
        monkeypatch.setenv(
            "BROKER_PROVIDERS__FACEBOOK__APP_SECRET_FILE", str(tmp_path / "app_secret")
        )
    example = Path(__file__).resolve().parents[2] / "config" / name

    assert main(["check-config", str(example)]) == 0
    assert f"{example}: OK" in capsys.readouterr().out


def test_check_config_reports_every_problem_with_its_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from broker.cli import main

    bad = tmp_path / "broker.toml"
    bad.write_text('[server]\npublic_url = "ftp://x"\nsurprise = 1\n[cache]\nlocal_seconds = -1\n')

    assert main(["check-config", str(bad)]) == 1
    err = capsys.readouterr().err
    for key in ("server.public_url", "server.surprise", "cache.local_seconds", "security."):
        assert key in err


# --------------------------------------------------------------------------- helpful messages

SUGGESTIONS: list[tuple[str, Mutation, str]] = [
    (
        "section",
        lambda c: c.update(servr={"log_level": "info"}),
        "servr: unknown key (did you mean 'server'?)",
    ),
    (
        "key",
        lambda c: c.update(redis={"urll": "redis://x:1/0"}),
        "redis.urll: unknown key (did you mean 'url'?)",
    ),
    (
        "provider key",
        lambda c: c["providers"]["corp"].update(isuer="https://x.example"),
        "providers.corp.isuer: unknown key (did you mean 'issuer'?)",
    ),
    (
        "rule key",
        lambda c: rule0(c).update(require_mfaa=True),
        "rules[0].require_mfaa: unknown key (did you mean 'require_mfa'?) (in rule 'r')",
    ),
    (
        "condition key",
        lambda c: rule0(c)["conditions"][0].update(vlaue="x"),
        "rules[0].conditions[0].vlaue: unknown key (did you mean 'value'?) (in rule 'r')",
    ),
    ("nothing close", lambda c: c.update(zzzz=1), "zzzz: unknown key"),
]


@pytest.mark.parametrize(
    ("mutation", "expected"), [row[1:] for row in SUGGESTIONS], ids=[row[0] for row in SUGGESTIONS]
)
def test_unknown_keys_suggest_the_closest_known_key(mutation: Mutation, expected: str) -> None:
    assert expected in problems(config(mutation))


def test_rule_problems_name_the_rule() -> None:
    raw = config(
        lambda c: rule0(c).update(roles=["Dev"]),
        lambda c: c["rules"].append(
            {"name": "payroll", "providers": ["corp"], "conditions": [], "roles": [DEV]}
        ),
    )
    found = problems(raw)
    assert "rules[0].roles: 'Dev' is not an IAM role ARN (in rule 'r')" in found
    assert any(
        p.startswith("rules[1].conditions:") and p.endswith("(in rule 'payroll')") for p in found
    ), found


def test_two_rules_with_one_name_are_refused() -> None:
    found = problems(config(lambda c: c["rules"].append(dict(rule0(c)))))
    assert found == ["rules: more than one rule is named 'r'"]


ENV_NAMED: list[tuple[dict[str, str], str]] = [
    (
        {"BROKER_SERVR__LOG_LEVEL": "debug"},
        "servr: unknown key (did you mean 'server'?) (from BROKER_SERVR__LOG_LEVEL)",
    ),
    (
        {"BROKER_SERVER__LOG_LEVEL": "loud"},
        "server.log_level: must be debug, info, warning or error (from BROKER_SERVER__LOG_LEVEL)",
    ),
    (
        {"BROKER_SERVER__WORKER_CLASS": "eventlet"},
        "server.worker_class: must be one of gevent, gthread (from BROKER_SERVER__WORKER_CLASS)",
    ),
    (
        {"BROKER_SERVER__WORKER_CLASS": "GEVENT"},
        "server.worker_class: must be one of gevent, gthread (from BROKER_SERVER__WORKER_CLASS)",
    ),
    (
        {"BROKER_STS__MAX_ATTEMPTS": "many"},
        "sts.max_attempts: must be an integer, got str (from BROKER_STS__MAX_ATTEMPTS)",
    ),
    ({"BROKER_REDIS__COLOUR": "red"}, "redis.colour: unknown key (from BROKER_REDIS__COLOUR)"),
]


@pytest.mark.parametrize(("env", "expected"), ENV_NAMED)
def test_problems_from_environment_variables_name_the_variable(
    env: dict[str, str], expected: str
) -> None:
    assert expected in problems(config(), env)


def test_a_file_problem_names_no_variable() -> None:
    found = problems(config(lambda c: c.update(server={"log_level": "loud"})), {})
    assert found == ["server.log_level: must be debug, info, warning or error"]


@pytest.mark.parametrize(
    "name",
    [
        "BROKER_VENV",
        "BROKER_CONFIG",
        "BROKER_SOMETHING_ELSE",
        "BROKER_",
        "BROKER_X_Y",
        "BROKER_URL",
    ],
)
def test_broker_variables_that_are_not_overrides_never_break_loading(name: str) -> None:
    assert load(config(), {name: "/work/venvs/x"}).redis.url == "redis://127.0.0.1:6379/0"


def test_admin_and_explain_denials_settings() -> None:
    default = load(config())
    assert default.admin.token is None
    assert default.server.explain_denials is True
    token = "t" * 40
    loaded = load(
        config(lambda c: c.update(admin={"token": token}, server={"explain_denials": False}))
    )
    assert loaded.admin.token == token
    assert loaded.server.explain_denials is False
    assert token not in repr(loaded)


@pytest.mark.parametrize(
    ("admin", "needle"),
    [
        ({"token": "short"}, "admin.token: must be at least 32 characters"),
        ({"token": 5}, "admin.token: must be a string"),
        ({"tokn": "t" * 40}, "admin.tokn: unknown key (did you mean 'token'?)"),
    ],
)
def test_admin_token_mistakes(admin: dict[str, Any], needle: str) -> None:
    found = problems(config(lambda c: c.update(admin=admin)))
    assert any(p.startswith(needle) for p in found), found


@pytest.mark.parametrize("form", ["flag", "positional"])
def test_check_config_takes_config_like_the_other_commands(
    form: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from broker.cli import main

    bad = tmp_path / "broker.toml"
    bad.write_text("[servr]\nlog_level = 'info'\n")
    argv = ["check-config", "--config", str(bad)] if form == "flag" else ["check-config", str(bad)]
    assert main(argv) == 1
    assert "servr: unknown key (did you mean 'server'?)" in capsys.readouterr().err


def test_the_longest_identity_region_still_makes_policy_safe_identity_ids() -> None:
    # The region check in settings stands in for the check policy makes per request.
    settings = load(config(lambda c: c.update(identity={"region": "r" * 27})))
    identity_id = IdentityIds(key=b"k" * 32, region=settings.identity.region).derive("p", "s")
    assert _SAFE_IDENTITY_ID_RE.fullmatch(identity_id)


@pytest.mark.parametrize(
    ("redis", "target"),
    [
        ({"url": "redis://10.0.0.1:6380/2", "password": "s3cret"}, "redis://10.0.0.1:6380/2"),
        ({"url": "rediss://cache.example.com/0"}, "rediss://cache.example.com:6379/0"),
        ({"url": "redis://[::1]:7000/0"}, "redis://[::1]:7000/0"),
        (
            {"mode": "cluster", "url": "redis://node-1:7000"},
            "Cluster at redis://node-1:7000",
        ),
    ],
)
def test_redis_target_names_the_address_and_never_a_secret(
    redis: dict[str, Any], target: str
) -> None:
    settings = load(config(lambda c: c.update(redis=redis)))
    assert settings.redis.target() == target
    assert "s3cret" not in settings.redis.target()
