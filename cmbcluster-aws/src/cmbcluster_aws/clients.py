"""The plugin's boto3 clients, made one way: one session with the operator's credentials (from the
environment or ``.env``, which boto3 alone would not read), the region, standard retries (throttling
and 5xx are retried by botocore), timeouts, the endpoint (moto, an S3-compatible service) and a user
agent. :func:`credentials_source` says which credentials that session uses (``config check``).

What botocore cannot retry, because AWS answers it as a client error, is IAM's eventual
consistency: a role made moments ago is not yet known everywhere, and S3 refuses a bucket policy
naming it ("Invalid principal in policy"), EKS a cluster using it. :func:`retry_while_propagating`
repeats such a call with backoff for IAM's propagation window, and only such a call.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from cmbcluster.errors import ConfigurationError
from cmbcluster_aws.settings import AwsSettings

__all__ = [
    "IAM_PROPAGATION_SECONDS", "close_clients", "credentials_source", "invalid_principal", "make_clients",
    "retry_while_propagating",
]  # fmt: skip

log = logging.getLogger(__name__)
T = TypeVar("T")

#: How long a call naming a new IAM role is retried. AWS documents IAM as eventually consistent
#: ("changes ... can take time to become visible", usually seconds); in practice new roles are
#: refused as principals for up to about half a minute, rarely longer.
IAM_PROPAGATION_SECONDS = 60.0


def make_clients(
    settings: AwsSettings,
    services: Iterable[str],
    *,
    given: Mapping[str, Any] | None = None,
    max_attempts: int = 5,
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
    user_agent: str = "cmbcluster",
    **config: Any,
) -> dict[str, Any]:
    """A client of each AWS service, by name; ``given`` ones (tests) are used as they are, and
    ``config`` adds botocore Config options (``max_pool_connections``, ``s3``...)."""
    given = given or {}
    options = Config(
        region_name=settings.aws_region,
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        user_agent_extra=user_agent,
        **config,
    )
    try:
        session = boto3.session.Session(**settings.session_credentials())
        return {
            service: given[service] if service in given else session.client(
                service, region_name=settings.aws_region, endpoint_url=settings.endpoint_url, config=options
            )
            for service in services
        }  # fmt: skip
    except BotoCoreError as exc:  # an unknown AWS_PROFILE, a malformed ~/.aws/config: this machine's setup
        raise ConfigurationError([f"AWS credentials: {exc}"]) from exc


#: botocore's names of its credential providers (``Credentials.method``), as an operator knows them.
_METHODS = {
    "shared-credentials-file": "~/.aws/credentials",
    "config-file": "~/.aws/config",
    "assume-role": "a role assumed with a profile of ~/.aws/config",
    "assume-role-with-web-identity": "a web identity token (AWS_WEB_IDENTITY_TOKEN_FILE: the pod's IRSA role)",
    "sso": "AWS IAM Identity Center (SSO; `aws sso login`)",
    "custom-process": "a profile's credential_process",
    "env": "the environment",
}


def credentials_source(settings: AwsSettings) -> str:
    """Which credentials the plugin's AWS calls use, found as boto3 will find them, without asking AWS
    (nor the instance metadata service: when nothing else is found, that is what boto3 tries last)."""
    if settings.aws_access_key_id is not None:
        origin = "the environment" if os.environ.get("AWS_ACCESS_KEY_ID") else ".env"
        key = settings.aws_access_key_id
        shown = f"{key[:4]}...{key[-4:]}" if len(key) > 12 else "(short)"
        token = " with AWS_SESSION_TOKEN" if settings.aws_session_token is not None else ""
        return f"the access key {shown} (AWS_ACCESS_KEY_ID{token}) from {origin}"
    profile = f" (profile {settings.aws_profile})" if settings.aws_profile else ""
    try:
        session = botocore.session.Session(profile=settings.aws_profile)
        resolver = session.get_component("credential_provider")
        for remote in ("container-role", "iam-role"):  # they would ask a metadata endpoint
            resolver.remove(remote)
        found = resolver.load_credentials()
    except BotoCoreError as exc:  # ProfileNotFound, a malformed ~/.aws/config...
        return f"none usable{profile}: {exc}"
    if found is None:
        return ("none in the environment, .env or ~/.aws: boto3 will ask the pod's or instance's role (EKS, EC2) "
                "last; elsewhere set AWS_PROFILE or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")  # fmt: skip
    return f"{_METHODS.get(found.method, found.method)}{profile}"


def close_clients(clients: Iterable[Any]) -> None:
    """Close each client; closing is best effort and never raises."""
    for client in clients:
        with contextlib.suppress(Exception):
            client.close()


def retry_while_propagating(
    call: Callable[[], T],
    *,
    pending: Callable[[ClientError], bool],
    what: str,
    window: float = IAM_PROPAGATION_SECONDS,
    first_delay: float = 0.5,
    max_delay: float = 8.0,
) -> T:
    """``call()``; while it fails with a ClientError that ``pending`` says is IAM not having caught up
    yet, again after a growing delay, for ``window`` seconds in all. Any other error, or the same one
    once the window is over, is raised as it is (callers map it)."""
    waited, delay = 0.0, first_delay
    while True:
        try:
            return call()
        except ClientError as exc:
            if not pending(exc) or waited >= window:
                raise
            pause = min(delay, max_delay, window - waited) if window > waited else 0.0
            log.info("%s: IAM has not propagated a new role yet (%s); retrying in %.1f s", what, exc, pause)
            time.sleep(pause)
            waited += max(pause, 1e-3)
            delay *= 2


def invalid_principal(exc: ClientError) -> bool:
    """S3's answer to a bucket policy naming a role IAM has not propagated yet."""
    error = exc.response.get("Error", {})
    return str(error.get("Code", "")) == "MalformedPolicy" and "principal" in str(error.get("Message", "")).lower()
