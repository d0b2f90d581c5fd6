"""Console sign-in: the pure rules (table-driven), the federation client against the local
federation endpoint on a real socket, and the console routes with a stand-in services
object (the seam ``create_app(services=...)`` offers).

The stand-in endpoint here checks credentials against a table instead of moto; the
end-to-end test (tests/integration/test_console_e2e.py) checks them against moto.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from broker import console
from broker.app import create_app
from broker.console import (
    PARTITIONS,
    ConsoleTarget,
    FederationClient,
    check_region,
    check_session_duration,
    credential_origin,
    login_url,
    partition_for_role,
    plan,
    resolve_destination,
    session_duration_param,
    session_json,
)
from broker.devstack.federation_server import (
    FederationServer,
    InvalidCredentials,
    start_federation_server,
)
from broker.devstack.processes import free_port
from broker.errors import (
    AccessDenied,
    BadRequest,
    BrokerError,
    DependencyUnavailable,
    InvalidToken,
    UpstreamError,
)
from broker.identity import Identity, IdentityIds, VerifiedClaims, VerifiedToken
from broker.rules import Grant
from broker.services import Issued, Services
from broker.settings import ConsoleSettings, Settings, settings_from_mapping
from broker.sts import IssuedCredentials
from broker.web.console import SessionLookup, install_session_lookup

ROLE = "arn:aws:iam::123456789012:role/Reader"
GOV_ROLE = "arn:aws-us-gov:iam::123456789012:role/Reader"
CN_ROLE = "arn:aws-cn:iam::123456789012:role/Reader"
PUBLIC_URL = "https://broker.example.com"
CSRF = "csrf-token-value"

CREDS = IssuedCredentials(
    access_key_id="ASIAEXAMPLEKEY000001",
    # Characters that must survive JSON and URL encoding unchanged.
    secret_access_key="s3cr3t/Key+With=Specials",
    session_token="IQoJb3JpZ2luX2VjE+/tokentoken==",
    expiration=datetime.now(UTC) + timedelta(hours=1),
    assumed_role_arn="arn:aws:sts::123456789012:assumed-role/Reader/alice",
    assumed_role_id="AROAEXAMPLE:alice",
)
FEDERATED_CREDS = IssuedCredentials(
    access_key_id="ASIAEXAMPLEKEY000002",
    secret_access_key="federated-secret",
    session_token="federated-token",
    expiration=datetime.now(UTC) + timedelta(hours=1),
    assumed_role_arn="arn:aws:sts::123456789012:federated-user/bob",
    assumed_role_id="123456789012:bob",
)
UNKNOWN_CREDS = IssuedCredentials(
    access_key_id="ASIAUNKNOWN000000003",
    secret_access_key="not-issued-by-sts",
    session_token="not-a-session-token",
    expiration=datetime.now(UTC) + timedelta(hours=1),
    assumed_role_arn="arn:aws:sts::123456789012:assumed-role/Reader/mallory",
    assumed_role_id="AROAEXAMPLE:mallory",
)
SECRETS = (CREDS.secret_access_key, CREDS.session_token)


def _verify(access_key_id: str, secret_access_key: str, session_token: str) -> str:
    """What the local STS would say: only credentials it issued, all three parts exact."""
    for creds in (CREDS, FEDERATED_CREDS):
        if (access_key_id, secret_access_key, session_token) == (
            creds.access_key_id,
            creds.secret_access_key,
            creds.session_token,
        ):
            return creds.assumed_role_arn
    raise InvalidCredentials("InvalidClientTokenId")


@pytest.fixture(scope="module")
def endpoint() -> Iterator[FederationServer]:
    with start_federation_server(verifier=_verify) as server:
        yield server


@pytest.fixture(autouse=True)
def _reset(endpoint: FederationServer) -> None:
    endpoint.state.forced_response = None


def console_settings(url: str | None, timeout: float = 5.0) -> ConsoleSettings:
    return ConsoleSettings(federation_url=url, timeout_seconds=timeout)


def target(url: str, destination: str = "https://console.aws.amazon.com/s3/home") -> ConsoleTarget:
    return ConsoleTarget(
        partition=PARTITIONS["aws"], region=None, destination=destination, federation_url=url
    )


# --------------------------------------------------------------------------- partitions


@pytest.mark.parametrize(
    ("role_arn", "partition", "federation_url", "console_host"),
    [
        (ROLE, "aws", "https://signin.aws.amazon.com/federation", "console.aws.amazon.com"),
        (
            GOV_ROLE,
            "aws-us-gov",
            "https://signin.amazonaws-us-gov.com/federation",
            "console.amazonaws-us-gov.com",
        ),
        (CN_ROLE, "aws-cn", "https://signin.amazonaws.cn/federation", "console.amazonaws.cn"),
    ],
)
def test_partition_comes_from_the_role_arn(
    role_arn: str, partition: str, federation_url: str, console_host: str
) -> None:
    found = partition_for_role(role_arn)
    assert found.name == partition
    assert found.federation_url(None) == federation_url
    assert found.console_host_for(None) == console_host
    planned = plan(role_arn, destination=None, region=None, settings=console_settings(None))
    assert planned.federation_url == federation_url
    assert urlsplit(planned.destination).netloc == console_host


@pytest.mark.parametrize(
    ("role_arn", "region", "federation_url"),
    [
        (ROLE, "us-east-1", "https://signin.aws.amazon.com/federation"),
        (ROLE, "us-west-2", "https://us-west-2.signin.aws.amazon.com/federation"),
        (ROLE, "eu-central-1", "https://eu-central-1.signin.aws.amazon.com/federation"),
        (GOV_ROLE, "us-gov-east-1", "https://signin.amazonaws-us-gov.com/federation"),
        (CN_ROLE, "cn-northwest-1", "https://signin.amazonaws.cn/federation"),
    ],
)
def test_regional_sign_in_endpoint_only_in_the_commercial_partition(
    role_arn: str, region: str, federation_url: str
) -> None:
    planned = plan(role_arn, destination="ec2", region=region, settings=console_settings(None))
    assert planned.federation_url == federation_url


@pytest.mark.parametrize("role_arn", [ROLE, GOV_ROLE, CN_ROLE])
def test_configured_federation_url_replaces_every_partitions_endpoint(role_arn: str) -> None:
    local = "http://127.0.0.1:9/federation"
    planned = plan(role_arn, destination="s3", region=None, settings=console_settings(local))
    assert planned.federation_url == local
    # ... but never the destination: that stays on the partition's own console.
    assert urlsplit(planned.destination).netloc == partition_for_role(role_arn).console_host


@pytest.mark.parametrize(
    "role_arn",
    [
        "",
        "arn:aws-iso:iam::123456789012:role/Reader",
        "arn:aws:iam::12345678901:role/Reader",
        "arn:aws:iam::123456789012:user/alice",
        "arn:aws:sts::123456789012:assumed-role/Reader/alice",
        "ARN:AWS:IAM::123456789012:role/Reader",
        "https://evil.example/arn:aws:iam::123456789012:role/Reader",
    ],
)
def test_role_arns_outside_the_three_partitions_are_refused(role_arn: str) -> None:
    with pytest.raises(BadRequest, match="role_arn"):
        partition_for_role(role_arn)


# --------------------------------------------------------------------------- regions


@pytest.mark.parametrize(
    ("role_arn", "region"),
    [
        (ROLE, "us-east-1"),
        (ROLE, "eu-central-2"),
        (ROLE, "ap-southeast-4"),
        (ROLE, "il-central-1"),
        (GOV_ROLE, "us-gov-west-1"),
        (GOV_ROLE, "us-gov-east-1"),
        (CN_ROLE, "cn-north-1"),
        (CN_ROLE, "cn-northwest-1"),
    ],
)
def test_regions_of_the_roles_partition_are_accepted(role_arn: str, region: str) -> None:
    assert check_region(partition_for_role(role_arn), region) == region


@pytest.mark.parametrize(
    ("role_arn", "region"),
    [
        (ROLE, "US-EAST-1"),
        (ROLE, "us-east"),
        (ROLE, "us-east-1 "),
        (ROLE, "us-east-1\n"),
        (ROLE, "us_east_1"),
        (ROLE, "us-east-12"),
        (ROLE, "us-east-1.evil.example"),
        (ROLE, "us-east-1/../x"),
        (ROLE, "a" * 40 + "-east-1"),
        (ROLE, "us-gov-west-1"),  # another partition's region
        (ROLE, "cn-north-1"),
        (ROLE, "us-isob-east-1"),
        (GOV_ROLE, "us-east-1"),
        (CN_ROLE, "us-east-1"),
    ],
)
def test_bad_or_foreign_regions_are_refused(role_arn: str, region: str) -> None:
    with pytest.raises(BadRequest, match="region"):
        check_region(partition_for_role(role_arn), region)


# --------------------------------------------------------------------------- destinations

AWS = PARTITIONS["aws"]
GOV = PARTITIONS["aws-us-gov"]
CN = PARTITIONS["aws-cn"]

ACCEPTED_DESTINATIONS = [
    (AWS, None, None, "https://console.aws.amazon.com/console/home"),
    (AWS, "", "us-east-1", "https://console.aws.amazon.com/console/home?region=us-east-1"),
    (
        AWS,
        None,
        "eu-west-1",
        "https://eu-west-1.console.aws.amazon.com/console/home?region=eu-west-1",
    ),
    (AWS, "s3", None, "https://console.aws.amazon.com/s3/home"),
    (AWS, "s3", "us-east-1", "https://console.aws.amazon.com/s3/home?region=us-east-1"),
    (AWS, "ec2", "eu-west-1", "https://eu-west-1.console.aws.amazon.com/ec2/home?region=eu-west-1"),
    (
        AWS,
        "cloudwatch",
        "us-west-2",
        "https://us-west-2.console.aws.amazon.com/cloudwatch/home?region=us-west-2",
    ),
    (AWS, "/", None, "https://console.aws.amazon.com/"),
    (
        AWS,
        "/ec2/home?region=eu-west-1#Instances:instanceState=running",
        None,
        "https://console.aws.amazon.com/ec2/home?region=eu-west-1#Instances:instanceState=running",
    ),
    (
        AWS,
        "/cloudwatch/home#logsV2:log-groups/log-group/$252Faws$252Flambda",
        None,
        "https://console.aws.amazon.com/cloudwatch/home#logsV2:log-groups/log-group/$252Faws$252Flambda",
    ),
    (AWS, "https://console.aws.amazon.com", None, "https://console.aws.amazon.com/"),
    (AWS, "https://console.aws.amazon.com?x=1", None, "https://console.aws.amazon.com/?x=1"),
    (
        AWS,
        "https://console.aws.amazon.com/iam/home#/roles",
        None,
        "https://console.aws.amazon.com/iam/home#/roles",
    ),
    (
        AWS,
        "https://us-west-2.console.aws.amazon.com/lambda/home?region=us-west-2",
        None,
        "https://us-west-2.console.aws.amazon.com/lambda/home?region=us-west-2",
    ),
    (
        GOV,
        "s3",
        "us-gov-west-1",
        "https://console.amazonaws-us-gov.com/s3/home?region=us-gov-west-1",
    ),
    (
        GOV,
        "https://console.amazonaws-us-gov.com/ec2/home",
        None,
        "https://console.amazonaws-us-gov.com/ec2/home",
    ),
    (
        GOV,
        "https://us-gov-east-1.console.amazonaws-us-gov.com/ec2/home",
        None,
        "https://us-gov-east-1.console.amazonaws-us-gov.com/ec2/home",
    ),
    (CN, "s3", "cn-north-1", "https://console.amazonaws.cn/s3/home?region=cn-north-1"),
    (
        CN,
        "https://cn-northwest-1.console.amazonaws.cn/ec2/home",
        None,
        "https://cn-northwest-1.console.amazonaws.cn/ec2/home",
    ),
]


@pytest.mark.parametrize(("partition", "destination", "region", "expected"), ACCEPTED_DESTINATIONS)
def test_accepted_destinations(
    partition: console.Partition, destination: str | None, region: str | None, expected: str
) -> None:
    assert resolve_destination(partition, destination, region) == expected


HOSTILE_DESTINATIONS = [
    # other hosts, and tricks that make a console host appear somewhere else in the URL
    "https://evil.example",
    "https://evil.example/",
    "https://evil.example/console.aws.amazon.com",
    "https://evil.example?console.aws.amazon.com",
    "https://evil.example#console.aws.amazon.com",
    "https://console.aws.amazon.com.evil.example/",
    "https://evilconsole.aws.amazon.com/",
    "https://a.b.console.aws.amazon.com/",
    "https://signin.aws.amazon.com/federation",
    "https://aws.amazon.com/",
    # userinfo
    "https://console.aws.amazon.com@evil.example",
    "https://console.aws.amazon.com@evil.example/",
    "https://user:password@console.aws.amazon.com/",
    "https://@console.aws.amazon.com/",
    "https://console.aws.amazon.com%40evil.example/",
    "https://console.aws.amazon.com%2F@evil.example",
    "https://evil.example\\@console.aws.amazon.com/",
    "https://console.aws.amazon.com#@evil.example",
    # ports, trailing dots, case
    "https://console.aws.amazon.com:443/",
    "https://console.aws.amazon.com:8443/",
    "https://console.aws.amazon.com:/",
    "https://console.aws.amazon.com./",
    "https://us-west-2.console.aws.amazon.com./",
    "https://CONSOLE.AWS.AMAZON.COM/",
    "https://Console.aws.amazon.com/",
    # schemes
    "HTTPS://console.aws.amazon.com/",
    "Https://console.aws.amazon.com/",
    "HTTPS://evil.example/",
    "http://console.aws.amazon.com/",
    "https:/console.aws.amazon.com/",
    "https:console.aws.amazon.com/",
    "https:\\\\console.aws.amazon.com/",
    "ftp://console.aws.amazon.com/",
    "javascript:alert(1)",
    "JavaScript:alert(document.domain)",
    "javascript://console.aws.amazon.com/%0aalert(1)",
    "data:text/html,<script>alert(1)</script>",
    "data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==",
    "vbscript:msgbox(1)",
    # scheme-relative and backslashes
    "//evil.example",
    "///evil.example",
    "/\\evil.example",
    "\\\\evil.example",
    "\\/evil.example",
    "https://console.aws.amazon.com//evil.example",
    "https://console.aws.amazon.com\\.evil.example/",
    "https://console.aws.amazon.com/\\evil.example",
    # percent-encoding hiding any of the above
    "%2F%2Fevil.example",
    "/%2F%2Fevil.example",
    "/%2f%2fevil.example",
    "/%5Cevil.example",
    "/%252F%252Fevil.example",
    "/%09/evil.example",
    "/%0d%0a/evil.example",
    "/%2540evil.example",
    "/%40evil.example",
    "/%E2%88%95evil.example",
    "/%ZZ",
    "https://console.aws.amazon.com/%2F%2Fevil.example",
    # '@' anywhere in a path
    "/path@evil.example",
    "/@evil.example",
    # control characters and whitespace
    "/\t/evil.example",
    "/\n/evil.example",
    "/s3\x00",
    " /s3",
    "s3 ",
    "https://console.aws.amazon.com/ s3",
    # IDN and other non-ASCII look-alikes
    "https://cónsole.aws.amazon.com/",
    "https://xn--cnsole-0ta.aws.amazon.com/",
    "https://console.aws.amazon.com\u3002evil.example/",
    "/\uff0f\uff0fevil.example",
    "https://console.aws.amazon.com\uff0fevil.example",
    # another partition's console, and region labels from another partition
    "https://console.amazonaws.cn/",
    "https://console.amazonaws-us-gov.com/",
    "https://us-gov-west-1.console.aws.amazon.com/",
    "https://cn-north-1.console.aws.amazon.com/",
    "https://evil.console.aws.amazon.com/",
    # not a shortcut, path or URL
    "S3",
    "s3/home",
    "s3.evil.example",
    "evil.example",
    "a" * 41,
    "/" + "a" * 2000,
]


@pytest.mark.parametrize("destination", HOSTILE_DESTINATIONS)
def test_hostile_destinations_are_refused(destination: str) -> None:
    with pytest.raises(BadRequest, match="destination") as caught:
        resolve_destination(AWS, destination, "us-east-1")
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("partition", "destination"),
    [
        (CN, "https://console.aws.amazon.com/"),
        (CN, "https://console.amazonaws-us-gov.com/"),
        (GOV, "https://console.aws.amazon.com/"),
        (GOV, "https://us-east-1.console.amazonaws-us-gov.com/"),
        (CN, "https://us-east-1.console.amazonaws.cn/"),
    ],
)
def test_destinations_stay_in_the_roles_partition(
    partition: console.Partition, destination: str
) -> None:
    with pytest.raises(BadRequest, match="destination"):
        resolve_destination(partition, destination, None)


# --------------------------------------------------------------------------- before the rules

# Hostile for a role of the commercial partition, but another partition's own console:
# with no role named, only the rules' choice can refuse them (still before minting).
FOREIGN_CONSOLES = {"https://console.amazonaws.cn/", "https://console.amazonaws-us-gov.com/"}
HOSTILE_IN_EVERY_PARTITION = [d for d in HOSTILE_DESTINATIONS if d not in FOREIGN_CONSOLES]

# Region values no console sign-in accepts, in any partition.
BAD_REGIONS = [
    "US-EAST-1",
    "us-east-1 ",
    "useast1",
    "us-east-1/../../evil",
    "us-isob-east-1",  # the form of a region, of a partition the broker does not sign in to
    "a" * 40,
    "us-east-1\n",
    "eu-west-1.evil.example",
]


def _request(**fields: Any) -> console.ConsoleRequest:
    values: dict[str, Any] = {
        "role_arn": None,
        "destination": None,
        "region": None,
        "session_duration": None,
    }
    values.update(fields)
    return console.ConsoleRequest(**values)


@pytest.mark.parametrize("role_arn", [None, ROLE])
@pytest.mark.parametrize("destination", HOSTILE_IN_EVERY_PARTITION)
def test_check_request_refuses_hostile_destinations_with_or_without_a_role(
    role_arn: str | None, destination: str
) -> None:
    with pytest.raises(BadRequest, match="destination"):
        console.check_request(
            _request(role_arn=role_arn, destination=destination), settings=console_settings(None)
        )


@pytest.mark.parametrize("destination", sorted(FOREIGN_CONSOLES))
def test_another_partitions_console_is_left_to_the_roles_partition(destination: str) -> None:
    # No role named: the destination is some partition's console, so it passes here ...
    assert (
        console.check_request(_request(destination=destination), settings=console_settings(None))
        is None
    )
    # ... and the rules' choice (a commercial role) refuses it before anything is minted.
    with pytest.raises(BadRequest, match="destination"):
        plan(ROLE, destination=destination, region=None, settings=console_settings(None))


@pytest.mark.parametrize("role_arn", [None, ROLE, GOV_ROLE, CN_ROLE])
@pytest.mark.parametrize("region", BAD_REGIONS)
def test_check_request_refuses_bad_regions_with_or_without_a_role(
    role_arn: str | None, region: str
) -> None:
    with pytest.raises(BadRequest, match="region"):
        console.check_request(
            _request(role_arn=role_arn, region=region), settings=console_settings(None)
        )


@pytest.mark.parametrize(
    ("destination", "region"),
    [
        ("https://console.aws.amazon.com/", "cn-north-1"),
        ("https://console.amazonaws.cn/", "us-east-1"),
        ("https://console.amazonaws-us-gov.com/", "eu-west-1"),
        ("https://eu-west-1.console.aws.amazon.com/", "us-gov-west-1"),
    ],
)
def test_a_region_pins_the_destination_to_its_partition(destination: str, region: str) -> None:
    with pytest.raises(BadRequest, match="destination"):
        console.check_request(
            _request(destination=destination, region=region), settings=console_settings(None)
        )


@pytest.mark.parametrize("role_arn", [None, ROLE])
@pytest.mark.parametrize("duration", [0, -900, 899, 43201, 129600])
def test_check_request_refuses_bad_session_durations(role_arn: str | None, duration: int) -> None:
    with pytest.raises(BadRequest, match="session_duration"):
        console.check_request(
            _request(role_arn=role_arn, session_duration=duration), settings=console_settings(None)
        )


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"destination": "s3", "region": "eu-west-1"},
        {"destination": "/ec2/home#Instances:", "session_duration": 900},
        {"destination": "https://console.amazonaws.cn/s3/home", "region": "cn-north-1"},
        {"destination": "https://us-gov-east-1.console.amazonaws-us-gov.com/ec2/home"},
        {"region": "us-gov-west-1"},
    ],
)
def test_check_request_lets_good_choices_through_without_a_role(fields: dict[str, Any]) -> None:
    assert console.check_request(_request(**fields), settings=console_settings(None)) is None


# --------------------------------------------------------------------------- SessionDuration


@pytest.mark.parametrize("value", [900, 3600, 43200, None])
def test_session_duration_bounds_accept(value: int | None) -> None:
    assert check_session_duration(value) == value


@pytest.mark.parametrize("value", [0, -900, 899, 43201, 129600])
def test_session_duration_bounds_refuse(value: int) -> None:
    with pytest.raises(BadRequest, match="session_duration must be between 900 and 43200"):
        check_session_duration(value)


@pytest.mark.parametrize(
    ("creds", "origin"),
    [
        (CREDS, "assume_role"),
        (FEDERATED_CREDS, "federation_token"),
        (
            IssuedCredentials(
                access_key_id="a",
                secret_access_key="b",
                session_token="c",
                expiration=datetime.now(UTC),
                assumed_role_arn="arn:aws-us-gov:sts::123456789012:assumed-role/R/s",
                assumed_role_id="x",
            ),
            "assume_role",
        ),
        (
            IssuedCredentials(
                access_key_id="a",
                secret_access_key="b",
                session_token="c",
                expiration=datetime.now(UTC),
                assumed_role_arn="arn:aws:iam::123456789012:user/alice",
                assumed_role_id="x",
            ),
            "unknown",
        ),
    ],
)
def test_credential_origin_is_read_from_the_principal(
    creds: IssuedCredentials, origin: str
) -> None:
    assert credential_origin(creds) == origin


@pytest.mark.parametrize(
    ("origin", "requested", "sent"),
    [
        ("assume_role", 3600, 3600),
        ("assume_role", 43200, 43200),
        ("assume_role", None, None),
        # AWS: "Do not use the SessionDuration HTTP parameter if you got the temporary
        # credentials with GetFederationToken. Doing so will cause the operation to fail."
        ("federation_token", 3600, None),
        ("unknown", 3600, None),
    ],
)
def test_session_duration_is_sent_only_with_assume_role_credentials(
    origin: console.CredentialOrigin, requested: int | None, sent: int | None
) -> None:
    assert session_duration_param(origin, requested) == sent


# --------------------------------------------------------------------------- URLs


def test_session_json_is_exactly_the_three_documented_keys() -> None:
    assert json.loads(session_json(CREDS)) == {
        "sessionId": CREDS.access_key_id,
        "sessionKey": CREDS.secret_access_key,
        "sessionToken": CREDS.session_token,
    }


def test_login_url_carries_exactly_the_documented_parameters() -> None:
    url = login_url(
        "https://signin.aws.amazon.com/federation",
        issuer=PUBLIC_URL,
        destination="https://console.aws.amazon.com/s3/home?region=eu-west-1#x",
        signin_token="tok+en/==",
    )
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == (
        "https://signin.aws.amazon.com/federation"
    )
    assert parse_qs(parts.query, strict_parsing=True) == {
        "Action": ["login"],
        "Issuer": [PUBLIC_URL],
        "Destination": ["https://console.aws.amazon.com/s3/home?region=eu-west-1#x"],
        "SigninToken": ["tok+en/=="],
    }
    assert not parts.fragment  # the destination's '#' is encoded, not ours


def test_repr_of_a_signin_never_shows_the_url() -> None:
    signin = console.ConsoleSignin(
        url="https://signin.aws.amazon.com/federation?SigninToken=secret",
        expires_at=datetime.now(UTC),
        destination="https://console.aws.amazon.com/",
        session_source="credentials",
        session_expires_at=datetime.now(UTC),
        session_duration_seconds=0,
    )
    assert "SigninToken" not in repr(signin)


# --------------------------------------------------------------------------- the client


def test_signin_against_the_local_endpoint(endpoint: FederationServer) -> None:
    now = time.time()
    client = FederationClient(settings=console_settings(endpoint.url), clock=lambda: now)
    signin = client.signin(target(endpoint.url), CREDS, issuer=PUBLIC_URL, session_duration=None)

    record = endpoint.records[-1]
    assert record.caller_arn == CREDS.assumed_role_arn
    assert record.session_duration is None  # nothing asked, nothing sent
    parts = urlsplit(signin.url)
    assert signin.url.startswith(endpoint.url + "?")
    assert parse_qs(parts.query) == {
        "Action": ["login"],
        "Issuer": [PUBLIC_URL],
        "Destination": ["https://console.aws.amazon.com/s3/home"],
        "SigninToken": [record.signin_token],
    }
    assert signin.expires_at == datetime.fromtimestamp(now + 900, UTC)
    assert signin.session_source == "credentials"
    assert signin.session_expires_at == CREDS.expiration

    page = requests.get(signin.url, timeout=5)
    assert page.status_code == 200
    assert CREDS.assumed_role_arn in page.text
    assert "console.aws.amazon.com/s3/home" in page.text


@pytest.mark.parametrize("duration", [900, 3600, 43200])
def test_session_duration_is_sent_for_assume_role_credentials(
    endpoint: FederationServer, duration: int
) -> None:
    now = time.time()
    client = FederationClient(settings=console_settings(endpoint.url), clock=lambda: now)
    signin = client.signin(
        target(endpoint.url), CREDS, issuer=PUBLIC_URL, session_duration=duration
    )
    assert endpoint.records[-1].session_duration == duration
    assert signin.session_source == "session_duration"
    assert signin.session_duration_seconds == duration
    assert signin.session_expires_at == datetime.fromtimestamp(now + duration, UTC)


def test_session_duration_is_left_out_for_federation_token_credentials(
    endpoint: FederationServer,
) -> None:
    client = FederationClient(settings=console_settings(endpoint.url))
    signin = client.signin(
        target(endpoint.url), FEDERATED_CREDS, issuer=PUBLIC_URL, session_duration=3600
    )
    assert endpoint.records[-1].session_duration is None
    assert signin.session_source == "credentials"
    assert signin.session_expires_at == FEDERATED_CREDS.expiration


def _upstream_error(endpoint_url: str, creds: IssuedCredentials = CREDS) -> BrokerError:
    client = FederationClient(settings=console_settings(endpoint_url, timeout=0.5))
    with pytest.raises(BrokerError) as caught:
        client.signin_token(endpoint_url, creds, None)
    for secret in (creds.secret_access_key, creds.session_token):
        assert secret not in str(caught.value)
    return caught.value


def test_invalid_credentials_parameter_is_a_clear_502(endpoint: FederationServer) -> None:
    error = _upstream_error(endpoint.url, UNKNOWN_CREDS)
    assert isinstance(error, UpstreamError)
    assert error.status == 502
    assert "Invalid credentials parameter" in error.message
    assert "127.0.0.1" in error.message


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (400, "<html><body>Invalid credentials parameter</body></html>", "Invalid credentials"),
        (400, "<html><body>Bad Request</body></html>", "refused the request (HTTP 400)"),
        (403, "Forbidden", "refused the request (HTTP 403)"),
        (500, "oops", "failed with HTTP 500"),
        (503, "busy", "failed with HTTP 503"),
        (200, "<html>not json</html>", "malformed response"),
        (200, '{"NotTheToken": "x"}', "without a SigninToken"),
        (200, '{"SigninToken": ""}', "without a SigninToken"),
        (200, '["SigninToken"]', "without a SigninToken"),
    ],
)
def test_federation_endpoint_failures_are_502(
    endpoint: FederationServer, status: int, body: str, expected: str
) -> None:
    endpoint.state.forced_response = (status, body)
    error = _upstream_error(endpoint.url)
    assert isinstance(error, UpstreamError)
    assert error.status == 502
    assert expected in error.message


def test_federation_endpoint_timeout_is_a_502_without_retries() -> None:
    # A listening socket that never answers: the connection is accepted by the kernel,
    # the request is sent, no response ever comes.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/federation"
        started = time.monotonic()
        error = _upstream_error(url)
        elapsed = time.monotonic() - started
    assert isinstance(error, UpstreamError)
    assert error.status == 502
    assert "timed out after 0.5s" in error.message
    assert elapsed < 1.4  # one timeout, not three


def test_unreachable_federation_endpoint_is_a_503() -> None:
    error = _upstream_error(f"http://127.0.0.1:{free_port()}/federation")
    assert isinstance(error, DependencyUnavailable)
    assert error.status == 503


# --------------------------------------------------------------------------- the stand-in


def _get(endpoint: FederationServer, params: Mapping[str, str] | list[tuple[str, str]]) -> Any:
    return requests.get(endpoint.url, params=params, timeout=5)


GOOD_SESSION = session_json(CREDS)


@pytest.mark.parametrize(
    "params",
    [
        {"Action": "getSigninToken"},
        {"Action": "getSigninToken", "Session": ""},
        {"Action": "getSigninToken", "Session": "not json"},
        {"Action": "getSigninToken", "Session": "[]"},
        {"Action": "getSigninToken", "Session": json.dumps({"sessionId": "a", "sessionKey": "b"})},
        {
            "Action": "getSigninToken",
            "Session": json.dumps(
                {"sessionId": "a", "sessionKey": "b", "sessionToken": "c", "extra": "d"}
            ),
        },
        {
            "Action": "getSigninToken",
            "Session": json.dumps({"sessionId": "a", "sessionKey": "b", "sessionToken": ""}),
        },
        {
            "Action": "getSigninToken",
            "Session": json.dumps({"sessionId": "a", "sessionKey": "b", "sessionToken": 1}),
        },
        {
            "Action": "getSigninToken",
            "Session": json.dumps(
                {"SessionId": "a", "SessionKey": "b", "SessionToken": "c"}  # wrong case
            ),
        },
        {"Action": "getSigninToken", "Session": GOOD_SESSION, "SessionDuration": "899"},
        {"Action": "getSigninToken", "Session": GOOD_SESSION, "SessionDuration": "43201"},
        {"Action": "getSigninToken", "Session": GOOD_SESSION, "SessionDuration": "3600.0"},
        {"Action": "getSigninToken", "Session": GOOD_SESSION, "SessionDuration": "-900"},
        {"Action": "getSigninToken", "Session": GOOD_SESSION, "SessionDuration": "1h"},
        {"Action": "getSigninToken", "Session": GOOD_SESSION, "SessionDuration": ""},
        # GetFederationToken's parameter, not getSigninToken's
        {"Action": "getSigninToken", "Session": GOOD_SESSION, "DurationSeconds": "3600"},
        {"Action": "getSigninToken", "Session": session_json(UNKNOWN_CREDS)},
        {"Action": "getsignintoken", "Session": GOOD_SESSION},
        {"Session": GOOD_SESSION},
    ],
)
def test_stand_in_refuses_what_aws_would(
    endpoint: FederationServer, params: Mapping[str, str]
) -> None:
    response = _get(endpoint, params)
    assert response.status_code == 400
    assert response.headers["Content-Type"].startswith("text/html")


def test_stand_in_refuses_repeated_parameters(endpoint: FederationServer) -> None:
    response = _get(
        endpoint,
        [("Action", "getSigninToken"), ("Session", GOOD_SESSION), ("Session", GOOD_SESSION)],
    )
    assert response.status_code == 400


def test_stand_in_refuses_session_duration_with_federation_token_credentials(
    endpoint: FederationServer,
) -> None:
    params = {"Action": "getSigninToken", "Session": session_json(FEDERATED_CREDS)}
    assert _get(endpoint, params).status_code == 200
    assert _get(endpoint, {**params, "SessionDuration": "3600"}).status_code == 400


def test_stand_in_checks_every_part_of_the_credentials(endpoint: FederationServer) -> None:
    for field_name in ("sessionId", "sessionKey", "sessionToken"):
        session = json.loads(GOOD_SESSION)
        session[field_name] += "x"
        response = _get(endpoint, {"Action": "getSigninToken", "Session": json.dumps(session)})
        assert response.status_code == 400, field_name
        assert "Invalid credentials parameter" in response.text


def _token(endpoint: FederationServer) -> str:
    response = _get(endpoint, {"Action": "getSigninToken", "Session": GOOD_SESSION})
    assert response.status_code == 200
    token: str = response.json()["SigninToken"]
    return token


@pytest.mark.parametrize(
    "destination",
    [
        "https://evil.example/",
        "http://console.aws.amazon.com/",
        "https://console.aws.amazon.com@evil.example/",
        "https://console.aws.amazon.com:8443/",
        "javascript:alert(1)",
    ],
)
def test_stand_in_login_refuses_non_console_destinations(
    endpoint: FederationServer, destination: str
) -> None:
    params = {
        "Action": "login",
        "Issuer": PUBLIC_URL,
        "Destination": destination,
        "SigninToken": _token(endpoint),
    }
    assert _get(endpoint, params).status_code == 400


def test_stand_in_login_refuses_unknown_and_expired_tokens() -> None:
    now = [1_000_000.0]
    with start_federation_server(verifier=_verify, clock=lambda: now[0]) as server:
        token = _token(server)
        params = {
            "Action": "login",
            "Issuer": PUBLIC_URL,
            "Destination": "https://console.aws.amazon.com/",
            "SigninToken": token,
        }
        assert _get(server, params).status_code == 200
        assert _get(server, {**params, "SigninToken": token + "x"}).status_code == 400
        now[0] += 15 * 60 + 1
        assert _get(server, params).status_code == 400


def test_stand_in_escapes_what_it_shows(endpoint: FederationServer) -> None:
    params = {
        "Action": "login",
        "Issuer": "<script>alert(1)</script>",
        "Destination": "https://console.aws.amazon.com/#<script>",
        "SigninToken": _token(endpoint),
    }
    page = _get(endpoint, params)
    assert page.status_code == 200
    assert "<script>" not in page.text


def test_stand_in_never_logs_request_lines(
    endpoint: FederationServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    _token(endpoint)
    assert CREDS.secret_access_key not in caplog.text


# --------------------------------------------------------------------------- the routes

IDS = IdentityIds(key=b"k" * 32, region="us-east-1")
ALICE = IDS.identify(
    VerifiedToken(
        provider="demo",
        subject="alice",
        claims=VerifiedClaims({"sub": "alice", "email": "alice@example.com"}),
        token="upstream-token",
        sts_provider_id=None,
        expires_at=int(time.time()) + 3600,
    )
)


@dataclass(kw_only=True)
class StandInServices(Services):
    """The services seam with identify/issue answered locally: the routes are under test,
    not the rules or STS (the end-to-end test runs those for real)."""

    issued: list[dict[str, Any]] = field(default_factory=list)
    decided: list[dict[str, Any]] = field(default_factory=list)
    identified: list[str] = field(default_factory=list)
    rules_choice: str = ROLE  # the role the "rules" pick when none is named

    def identify(
        self,
        provider: str,
        token: str,
        *,
        nonce: str | None = None,  # noqa: ARG002 - the interface's signature
    ) -> Identity:
        self.identified.append(provider)
        if token != "good-token":
            raise InvalidToken()
        return ALICE

    def decide(
        self,
        identity: Identity,  # noqa: ARG002 - the interface's signature
        *,
        role_arn: str | None = None,
        duration_seconds: int | None = None,
    ) -> Grant:
        self.decided.append({"role_arn": role_arn, "duration_seconds": duration_seconds})
        return Grant(
            rule="readers",
            role_arn=role_arn or self.rules_choice,
            duration_seconds=duration_seconds or 3600,
            session_policy=None,
            policy_arns=(),
        )

    def mint(self, identity: Identity, grant: Grant, *, self_renewing: bool = False) -> Issued:
        self.issued.append(
            {
                "role_arn": grant.role_arn,
                "duration_seconds": grant.duration_seconds,
                "self_renewing": self_renewing,
            }
        )
        return Issued(identity=identity, grant=grant, credentials=CREDS)

    def limit_address(self, *_args: object) -> None:
        return None  # rate limits need Redis; they are not what is tested here


def _settings(federation_url: str) -> Settings:
    key = base64.b64encode(os.urandom(32)).decode()
    return settings_from_mapping(
        {
            "server": {"public_url": PUBLIC_URL},
            "security": {"identity_key": key, "encryption_keys": [key]},
            "console": {"federation_url": federation_url, "timeout_seconds": 2},
            "providers": {
                "demo": {
                    "type": "oidc",
                    "display_name": "Demo",
                    "issuer": "https://idp.example.com",
                    "client_ids": ["broker"],
                }
            },
            "rules": [
                {
                    "providers": ["demo"],
                    "conditions": [
                        {"claim": "email", "op": "equals", "value": "alice@example.com"}
                    ],
                    "roles": [ROLE],
                    # A console session may not outlast what the rule allows.
                    "max_duration_seconds": 7200,
                }
            ],
        },
        env={},
    )


@pytest.fixture
def services(endpoint: FederationServer) -> StandInServices:
    return StandInServices(
        settings=_settings(endpoint.url),
        store=cast(Any, None),
        http=cast(Any, None),
        providers={},
        identity_ids=IDS,
        sts=cast(Any, None),
        credentials=cast(Any, None),
    )


def _no_csrf_expected(_submitted: str | None) -> None:
    raise AssertionError("nobody is signed in: CSRF must not be checked")


@pytest.fixture
def app(services: StandInServices) -> Flask:
    app = create_app(services=services)
    # Nobody signed in, whatever session support the app has installed.
    install_session_lookup(app, SessionLookup(identity=lambda: None, check_csrf=_no_csrf_expected))
    return app


@pytest.fixture
def signed_in(app: Flask) -> Flask:
    """Alice signed in; the form's CSRF token is CSRF."""

    def check_csrf(submitted: str | None) -> None:
        if submitted != CSRF:
            raise AccessDenied("the request's CSRF token is missing or wrong")

    install_session_lookup(app, SessionLookup(identity=lambda: ALICE, check_csrf=check_csrf))
    return app


def _secret_headers_ok(response: Any) -> None:
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Referrer-Policy"] == "no-referrer"


def _login_params(location: str, endpoint: FederationServer) -> dict[str, list[str]]:
    assert location.startswith(endpoint.url + "?")
    return parse_qs(urlsplit(location).query)


def test_browser_without_a_session_is_sent_to_sign_in(app: Flask) -> None:
    path = f"/console?role_arn={ROLE}&destination=s3&region=eu-west-1"
    response = app.test_client().get(path)
    assert response.status_code == 302
    location = urlsplit(response.headers["Location"])
    assert location.path == "/login"
    assert not location.netloc
    (next_path,) = parse_qs(location.query)["next"]
    assert urlsplit(next_path).path == "/console"
    assert parse_qs(urlsplit(next_path).query) == {
        "role_arn": [ROLE],
        "destination": ["s3"],
        "region": ["eu-west-1"],
    }
    _secret_headers_ok(response)


def test_form_post_without_a_session_is_sent_to_sign_in(app: Flask) -> None:
    response = app.test_client().post("/console", data={"role_arn": ROLE, "csrf_token": "x"})
    assert response.status_code == 303
    assert response.headers["Location"] == "/login?next=%2F"


def test_json_client_without_a_session_gets_401(app: Flask) -> None:
    response = app.test_client().get(
        f"/console?role_arn={ROLE}", headers={"Accept": "application/json"}
    )
    assert response.status_code == 401
    assert response.get_json()["error"] == "unauthenticated"


def test_browser_flow_redirects_to_the_sign_in_url(
    signed_in: Flask, services: StandInServices, endpoint: FederationServer
) -> None:
    client: FlaskClient = signed_in.test_client()
    response = client.get(f"/console?role_arn={ROLE}&destination=ec2&region=eu-west-1")
    assert response.status_code == 302
    _secret_headers_ok(response)
    params = _login_params(response.headers["Location"], endpoint)
    assert params == {
        "Action": ["login"],
        "Issuer": [PUBLIC_URL],
        "Destination": ["https://eu-west-1.console.aws.amazon.com/ec2/home?region=eu-west-1"],
        "SigninToken": [endpoint.records[-1].signin_token],
    }
    assert services.issued == [{"role_arn": ROLE, "duration_seconds": 3600, "self_renewing": False}]
    assert endpoint.records[-1].session_duration is None


def test_browser_flow_with_a_session_duration(
    signed_in: Flask, services: StandInServices, endpoint: FederationServer
) -> None:
    response = signed_in.test_client().get(f"/console?role_arn={ROLE}&session_duration=7200")
    assert response.status_code == 302
    assert endpoint.records[-1].session_duration == 7200
    # The console session's length is also the credentials' (the rule bounds both).
    assert services.issued == [{"role_arn": ROLE, "duration_seconds": 7200, "self_renewing": False}]


def test_form_post_checks_csrf(signed_in: Flask, endpoint: FederationServer) -> None:
    client = signed_in.test_client()
    refused = client.post("/console", data={"role_arn": ROLE, "csrf_token": "wrong"})
    assert refused.status_code == 403
    response = client.post("/console", data={"role_arn": ROLE, "csrf_token": CSRF})
    assert response.status_code == 303
    _secret_headers_ok(response)
    assert _login_params(response.headers["Location"], endpoint)["Destination"] == [
        "https://console.aws.amazon.com/console/home"
    ]


@pytest.mark.parametrize(
    "query",
    [
        f"role_arn={ROLE}&destination=https://evil.example/",
        f"role_arn={ROLE}&destination=//evil.example",
        f"role_arn={ROLE}&destination=https://console.aws.amazon.com@evil.example",
        f"role_arn={ROLE}&region=us-gov-west-1",
        f"role_arn={ROLE}&session_duration=899",
        f"role_arn={ROLE}&session_duration=1h",
        f"role_arn={ROLE}&destinaton=s3",
        f"role_arn={ROLE}&destination=s3&destination=ec2",
        "role_arn=arn:aws:iam::123456789012:user/alice",
    ],
)
def test_browser_bad_parameters_are_400_before_anything_is_minted(
    signed_in: Flask, services: StandInServices, endpoint: FederationServer, query: str
) -> None:
    tokens_before = len(endpoint.records)
    response = signed_in.test_client().get(f"/console?{query}")
    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_request"
    assert services.issued == []
    assert len(endpoint.records) == tokens_before


def _api(app: Flask, **body: Any) -> Any:
    return app.test_client().post(
        "/v1/console-url", json={"provider": "demo", "token": "good-token", **body}
    )


def test_api_returns_url_and_expiry(
    app: Flask, services: StandInServices, endpoint: FederationServer
) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    response = _api(app, role_arn=ROLE, destination="s3", region="us-east-1")
    assert response.status_code == 200
    _secret_headers_ok(response)
    body = response.get_json()
    params = _login_params(body["url"], endpoint)
    assert params["Destination"] == ["https://console.aws.amazon.com/s3/home?region=us-east-1"]
    assert params["SigninToken"] == [endpoint.records[-1].signin_token]
    expires = datetime.strptime(body["expires_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert before + timedelta(seconds=899) <= expires <= before + timedelta(seconds=902)
    assert body["role_arn"] == ROLE
    assert body["identity_id"] == ALICE.identity_id
    assert body["session_source"] == "credentials"
    assert body["session_expires_at"] == CREDS.expiration.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert 0 < body["session_duration_seconds"] <= 3600


def test_api_session_duration_is_sent_and_reported(
    app: Flask, services: StandInServices, endpoint: FederationServer
) -> None:
    response = _api(app, role_arn=ROLE, session_duration=7200)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert endpoint.records[-1].session_duration == 7200
    assert body["session_source"] == "session_duration"
    assert body["session_duration_seconds"] == 7200
    assert services.issued == [{"role_arn": ROLE, "duration_seconds": 7200, "self_renewing": False}]


def test_api_session_duration_beyond_the_rules_maximum_is_400(
    app: Flask, services: StandInServices, endpoint: FederationServer
) -> None:
    tokens_before = len(endpoint.records)
    response = _api(app, role_arn=ROLE, session_duration=7201)
    assert response.status_code == 400
    assert "session_duration may be at most 7200 seconds" in response.get_json()["message"]
    assert services.issued == []
    assert len(endpoint.records) == tokens_before


def test_api_without_role_uses_the_rules_choice(app: Flask, endpoint: FederationServer) -> None:
    body = _api(app, destination="https://console.aws.amazon.com/iam/home").get_json()
    assert body["role_arn"] == ROLE
    assert _login_params(body["url"], endpoint)["Destination"] == [
        "https://console.aws.amazon.com/iam/home"
    ]


@pytest.mark.parametrize(
    "body",
    [
        {"role_arn": ROLE, "destination": "https://evil.example/"},
        {"role_arn": ROLE, "destination": "javascript:alert(1)"},
        {"role_arn": ROLE, "region": "cn-north-1"},
        {"role_arn": ROLE, "session_duration": 60},
        {"role_arn": ROLE, "session_duration": 50000},
        {"role_arn": ROLE, "session_duration": "3600"},
        {"role_arn": ROLE, "session_duration": True},
        {"role_arn": ROLE, "destination": 1},
        {"role_arn": ROLE, "duration_seconds": 3600},
        {"role_arn": "arn:aws:iam::123456789012:user/alice"},
    ],
)
def test_api_bad_requests_fail_before_the_token_is_verified(
    app: Flask, services: StandInServices, body: dict[str, Any]
) -> None:
    response = _api(app, **body)
    assert response.status_code == 400
    assert services.identified == []
    assert services.issued == []


def test_api_destination_checked_after_the_rules_choose_the_role(
    app: Flask, services: StandInServices
) -> None:
    response = _api(app, destination="https://evil.example/")
    assert response.status_code == 400
    assert "destination" in response.get_json()["message"]


def test_api_bad_token_is_401(app: Flask) -> None:
    response = app.test_client().post(
        "/v1/console-url", json={"provider": "demo", "token": "bad", "role_arn": ROLE}
    )
    assert response.status_code == 401


def test_api_federation_failure_is_502(app: Flask, endpoint: FederationServer) -> None:
    endpoint.state.forced_response = (400, "<html>Invalid credentials parameter</html>")
    response = _api(app, role_arn=ROLE)
    assert response.status_code == 502
    body = response.get_json()
    assert body["error"] == "upstream_error"
    assert "Invalid credentials parameter" in body["message"]
    assert response.headers["Cache-Control"] == "no-store"


def test_the_sign_in_url_is_never_logged(
    signed_in: Flask, endpoint: FederationServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = _api(signed_in, role_arn=ROLE, destination="s3").get_json()["url"]
    redirect = signed_in.test_client().get(f"/console?role_arn={ROLE}")
    tokens = [r.signin_token for r in endpoint.records[-2:]]
    assert redirect.status_code == 302
    audit = [r for r in caplog.records if getattr(r, "audit", {}).get("event") == "console_signin"]
    assert len(audit) == 2  # the sign-ins are audited ...
    for record in caplog.records:  # ... but no record holds the URL, the token or a secret
        text = record.getMessage() + repr(record.__dict__)
        for secret in (url, *tokens, *SECRETS, "SigninToken="):
            assert secret not in text


# --------------------------------------------------------------------------- every door, no role


BAD_CHOICES_WITHOUT_ROLE = [
    *({"destination": d} for d in ("https://evil.example/", "//evil.example", "javascript:x")),
    *({"region": r} for r in BAD_REGIONS[:4]),
    {"destination": "https://console.aws.amazon.com/", "region": "cn-north-1"},
    {"session_duration": "899"},
    {"session_duration": "43201"},
]


@pytest.mark.parametrize("choice", BAD_CHOICES_WITHOUT_ROLE)
@pytest.mark.parametrize("door", ["GET /console", "POST /console", "POST /v1/console-url"])
def test_no_role_named_bad_choices_fail_before_the_rules_and_minting(
    signed_in: Flask, services: StandInServices, door: str, choice: dict[str, str]
) -> None:
    client = signed_in.test_client()
    if door == "GET /console":
        response = client.get("/console", query_string=choice)
    elif door == "POST /console":
        response = client.post("/console", data={**choice, "csrf_token": CSRF})
    else:
        body: dict[str, Any] = dict(choice)
        if "session_duration" in body:
            body["session_duration"] = int(body["session_duration"])
        response = _api(signed_in, **body)
    assert response.status_code == 400, response.get_data(as_text=True)
    assert response.get_json()["error"] == "invalid_request"
    assert services.identified == []
    assert services.decided == []
    assert services.issued == []


@pytest.mark.parametrize(
    ("choice", "needle"),
    [
        ({"region": "cn-north-1"}, "partition"),
        ({"region": "us-gov-west-1", "destination": "s3"}, "partition"),
        ({"destination": "https://console.amazonaws.cn/"}, "destination"),
        ({"destination": "https://console.amazonaws-us-gov.com/"}, "destination"),
    ],
)
@pytest.mark.parametrize("door", ["GET /console", "POST /v1/console-url"])
def test_the_rules_choice_is_checked_before_minting(
    signed_in: Flask, services: StandInServices, door: str, choice: dict[str, str], needle: str
) -> None:
    """Valid in some partition, but the rules choose a commercial role: refused after the
    rules decide and before anything is minted."""
    if door == "GET /console":
        response = signed_in.test_client().get("/console", query_string=choice)
    else:
        response = _api(signed_in, **choice)
    assert response.status_code == 400
    assert needle in response.get_json()["message"]
    assert services.decided == [{"role_arn": None, "duration_seconds": None}]
    assert services.issued == []
