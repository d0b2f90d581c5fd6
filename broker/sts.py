"""AssumeRoleWithWebIdentity: the only AWS call the broker makes, and its errors.

(Interface only so far; the botocore implementation follows below it.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol


@dataclass(frozen=True, kw_only=True)
class AssumeRequest:
    role_arn: str
    session_name: str
    web_identity_token: str = field(repr=False)
    provider_id: str | None  # None for OIDC ID tokens
    duration_seconds: int
    policy: str | None  # minified JSON session policy
    policy_arns: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class IssuedCredentials:
    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str = field(repr=False)
    expiration: datetime  # timezone-aware UTC
    assumed_role_arn: str
    assumed_role_id: str

    def credential_process(self) -> dict[str, Any]:
        """Exactly the AWS CLI/SDK ``credential_process`` object."""
        return {
            "Version": 1,
            "AccessKeyId": self.access_key_id,
            "SecretAccessKey": self.secret_access_key,
            "SessionToken": self.session_token,
            "Expiration": self.expiration.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }


class STS(Protocol):
    def assume_role_with_web_identity(self, request: AssumeRequest) -> IssuedCredentials: ...
