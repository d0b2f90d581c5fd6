"""BotocoreSTS against moto with IAM authentication on, and what moto then enforces.

The credentials are used for real signed S3 calls: they work where the role's policy
allows and are refused elsewhere, and anything not issued by STS is refused.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import botocore.auth
import botocore.credentials
import pytest
import requests
from botocore.awsrequest import AWSRequest
from botocore.exceptions import ClientError

from broker.sts import AssumeRequest, BotocoreSTS, IssuedCredentials
from tests.integration.aws_fixtures import (
    ALLOWED_BUCKET,
    OTHER_BUCKET,
    READER_ROLE,
    REGION,
    LocalAWS,
    local_aws,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def aws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalAWS]:
    with local_aws(tmp_path_factory.mktemp("moto")) as running:
        yield running


@pytest.fixture(scope="module")
def sts(aws: LocalAWS) -> Iterator[BotocoreSTS]:
    client = BotocoreSTS(aws.sts_settings())
    yield client
    client.close()


def request(**overrides: object) -> AssumeRequest:
    values: dict[str, object] = {
        "role_arn": READER_ROLE,
        "session_name": "alice",
        # moto does not validate web identity tokens: any string gets through.
        "web_identity_token": "not-a-real-token",
        "provider_id": None,
        "duration_seconds": 900,
        "policy": None,
        "policy_arns": (),
    }
    values.update(overrides)
    return AssumeRequest(**values)  # type: ignore[arg-type]


def error_of(exc: pytest.ExceptionInfo[ClientError]) -> tuple[str | None, int]:
    response = exc.value.response
    return response.get("Error", {}).get("Code"), response["ResponseMetadata"]["HTTPStatusCode"]


@pytest.fixture(scope="module")
def reader(sts: BotocoreSTS) -> IssuedCredentials:
    return sts.assume_role_with_web_identity(request())


# --------------------------------------------------------------------------- STS


def test_unsigned_web_identity_call_gets_credentials(reader: IssuedCredentials) -> None:
    assert reader.access_key_id.startswith("ASIA")
    assert reader.secret_access_key
    assert reader.session_token
    assert reader.assumed_role_arn == (
        "arn:aws:sts::123456789012:assumed-role/BrokerTestReader/alice"
    )
    assert reader.assumed_role_id.endswith(":alice")
    assert reader.expiration.tzinfo is not None
    remaining = (reader.expiration - datetime.now(UTC)).total_seconds()
    assert 0 < remaining <= 900


def test_request_parameters_reach_sts(aws: LocalAWS, sts: BotocoreSTS) -> None:
    policy = json.dumps({"Version": "2012-10-17", "Statement": []}, separators=(",", ":"))
    with aws.recording() as recording:
        sts.assume_role_with_web_identity(
            request(
                provider_id="www.amazon.com",
                policy=policy,
                policy_arns=("arn:aws:iam::aws:policy/ReadOnlyAccess",),
                duration_seconds=1800,
            )
        )
        sts.assume_role_with_web_identity(request())

    with_provider, without = recording.sts_calls()
    assert with_provider["ProviderId"] == "www.amazon.com"
    assert with_provider["Policy"] == policy
    assert with_provider["PolicyArns.member.1.arn"] == "arn:aws:iam::aws:policy/ReadOnlyAccess"
    assert with_provider["DurationSeconds"] == "1800"
    assert with_provider["WebIdentityToken"] == "not-a-real-token"
    assert "ProviderId" not in without
    assert "Policy" not in without


def test_only_unsigned_web_identity_calls_skip_the_checks(aws: LocalAWS) -> None:
    """The launcher's passthrough is for unsigned calls: a signed one is still checked."""
    body = (
        "Action=AssumeRoleWithWebIdentity&Version=2011-06-15"
        f"&RoleArn={READER_ROLE}&RoleSessionName=alice&WebIdentityToken=x"
    )
    signed = AWSRequest(
        method="POST",
        url=f"{aws.url}/",
        data=body.encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    unknown = botocore.credentials.Credentials("AKIAUNKNOWNKEY000000", "not-a-secret")
    botocore.auth.SigV4Auth(unknown, "sts", REGION).add_auth(signed)
    prepared = signed.prepare()

    response = requests.post(
        prepared.url, data=prepared.body, headers=dict(prepared.headers), timeout=10
    )
    assert response.status_code == 403
    assert "<Code>InvalidClientTokenId</Code>" in response.text


# --------------------------------------------------------------------------- S3 with them


def test_role_policy_allows_listing_its_bucket(aws: LocalAWS, reader: IssuedCredentials) -> None:
    s3 = aws.client("s3", reader)
    assert s3.list_objects_v2(Bucket=ALLOWED_BUCKET)["KeyCount"] == 0


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda s3: s3.list_objects_v2(Bucket=OTHER_BUCKET), id="other-bucket"),
        pytest.param(
            lambda s3: s3.put_object(Bucket=ALLOWED_BUCKET, Key="k", Body=b"x"),
            id="action-not-allowed",
        ),
        pytest.param(lambda s3: s3.list_buckets(), id="list-all-buckets"),
    ],
)
def test_role_policy_refuses_everything_else(
    aws: LocalAWS, reader: IssuedCredentials, call: Callable[[Any], object]
) -> None:
    s3 = aws.client("s3", reader)
    with pytest.raises(ClientError) as caught:
        call(s3)
    assert error_of(caught) == ("AccessDenied", 403)


def test_assumed_role_cannot_call_iam(aws: LocalAWS, reader: IssuedCredentials) -> None:
    with pytest.raises(ClientError) as caught:
        aws.client("iam", reader).list_roles()
    assert error_of(caught) == ("AccessDenied", 403)


def test_a_wider_role_policy_allows_more(aws: LocalAWS, sts: BotocoreSTS) -> None:
    """Each S3 call is authorized by the IAM action AWS checks for it, not by its
    operation name: ListObjectsV2 by s3:ListBucket, HeadObject by s3:GetObject (IAM has
    no s3:ListObjectsV2 or s3:HeadObject). moto 5.2.6 checks operation names and refuses
    both, which is why pyproject.toml keeps moto below it."""
    writer = sts.assume_role_with_web_identity(
        request(role_arn=READER_ROLE.replace("Reader", "Writer"))
    )
    s3 = aws.client("s3", writer)
    s3.put_object(Bucket=ALLOWED_BUCKET, Key="hello.txt", Body=b"hi")
    assert s3.get_object(Bucket=ALLOWED_BUCKET, Key="hello.txt")["Body"].read() == b"hi"
    assert s3.head_object(Bucket=ALLOWED_BUCKET, Key="hello.txt")["ContentLength"] == 2
    listed = s3.list_objects_v2(Bucket=ALLOWED_BUCKET, Prefix="hello")
    assert [item["Key"] for item in listed["Contents"]] == ["hello.txt"]


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (
            lambda _: {"aws_access_key_id": "AKIAGARBAGE000000000", "aws_secret_access_key": "x"},
            ("InvalidAccessKeyId", 403),
        ),
        (
            lambda _: {
                "aws_access_key_id": "ASIAGARBAGE000000000",
                "aws_secret_access_key": "x",
                "aws_session_token": "garbage",
            },
            ("InvalidAccessKeyId", 403),
        ),
        (
            lambda c: {
                "aws_access_key_id": c.access_key_id,
                "aws_secret_access_key": "wrong",
                "aws_session_token": c.session_token,
            },
            ("SignatureDoesNotMatch", 403),
        ),
        (
            lambda c: {
                "aws_access_key_id": c.access_key_id,
                "aws_secret_access_key": c.secret_access_key,
                "aws_session_token": "garbage",
            },
            ("InvalidToken", 400),
        ),
    ],
    ids=["unknown-key", "unknown-session-key", "wrong-secret", "wrong-session-token"],
)
def test_credentials_not_issued_by_sts_are_refused(
    aws: LocalAWS,
    reader: IssuedCredentials,
    tamper: Callable[[IssuedCredentials], dict[str, str]],
    expected: tuple[str, int],
) -> None:
    keys = tamper(reader)
    with pytest.raises(ClientError) as caught:
        aws.raw_client("s3", **keys).list_objects_v2(Bucket=ALLOWED_BUCKET)
    assert error_of(caught) == expected


@pytest.mark.parametrize(
    ("service", "call"),
    [
        pytest.param("s3", lambda c: c.list_objects_v2(Bucket=ALLOWED_BUCKET), id="s3"),
        pytest.param("iam", lambda c: c.list_roles(), id="iam"),
        pytest.param("sts", lambda c: c.get_caller_identity(), id="sts"),
    ],
)
def test_unsigned_calls_are_refused(
    aws: LocalAWS, service: str, call: Callable[[Any], object]
) -> None:
    client = aws.raw_client(service)
    with pytest.raises(ClientError) as caught:
        call(client)
    # moto hands an unsigned call it cannot attribute to a service to S3, so the error
    # body may be S3-shaped; what matters is the 403.
    assert error_of(caught)[1] == 403


def test_admin_keys_can_inspect_iam(aws: LocalAWS) -> None:
    roles = {role["RoleName"] for role in aws.client("iam").list_roles()["Roles"]}
    assert {"BrokerTestReader", "BrokerTestWriter"} <= roles


# --------------------------------------------------------------------------- moto's gaps


def test_moto_does_not_apply_session_policies(aws: LocalAWS, sts: BotocoreSTS) -> None:
    """A known gap of the stand-in, pinned so it is noticed if moto ever closes it:
    session policies must be checked by our own tests, not by moto."""
    deny_all = json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Deny", "Action": "*", "Resource": "*"}],
        }
    )
    scoped = sts.assume_role_with_web_identity(request(policy=deny_all))
    # AWS would refuse this call (the session policy denies everything); moto answers it.
    listed = aws.client("s3", scoped).list_objects_v2(Bucket=ALLOWED_BUCKET)
    assert (listed["ResponseMetadata"]["HTTPStatusCode"], listed["Name"]) == (200, ALLOWED_BUCKET)


def test_moto_does_not_check_that_the_role_exists(sts: BotocoreSTS) -> None:
    issued = sts.assume_role_with_web_identity(
        request(role_arn="arn:aws:iam::123456789012:role/DoesNotExist")
    )
    assert issued.assumed_role_arn.endswith("assumed-role/DoesNotExist/alice")
    assert time.time() < issued.expiration.timestamp()
