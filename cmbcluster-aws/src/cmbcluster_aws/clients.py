"""The plugin's boto3 clients, made one way: the region, standard retries (throttling and 5xx are
retried by botocore), timeouts, the endpoint (moto, an S3-compatible service) and a user agent."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any

import boto3
from botocore.config import Config

from cmbcluster_aws.settings import AwsSettings

__all__ = ["close_clients", "make_clients"]


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
    session = boto3.session.Session()
    return {
        service: given[service] if service in given else session.client(
            service, region_name=settings.aws_region, endpoint_url=settings.endpoint_url, config=options
        )
        for service in services
    }  # fmt: skip


def close_clients(clients: Iterable[Any]) -> None:
    """Close each client; closing is best effort and never raises."""
    for client in clients:
        with contextlib.suppress(Exception):
            client.close()
