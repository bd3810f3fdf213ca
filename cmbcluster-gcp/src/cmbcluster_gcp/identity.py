"""GCP infra: per-user Workload Identity, the Artifact Registry and DNS names.

Every user's pods run as their own Kubernetes ServiceAccount ``cmbcluster-user-<short id>``,
built from CMBCluster's opaque user id (never an e-mail address). Two modes, one interface:

- ``workload-identity`` (default, Workload Identity Federation for GKE): the ServiceAccount is
  itself the principal. Buckets are granted (by :meth:`GcsStorage.ensure_bucket_access`) to
  exactly ``principal://iam.googleapis.com/projects/<number>/locations/global/workloadIdentityPools/
  <project>.svc.id.goog/subject/ns/<namespace>/sa/<service account>``. No IAM object is created.
- ``service-account``: one Google service account per user, which only that ServiceAccount may
  impersonate (``roles/iam.workloadIdentityUser`` on the Google service account, for exactly
  ``serviceAccount:<project>.svc.id.goog[<namespace>/<service account>]``). The ServiceAccount
  carries the ``iam.gke.io/gcp-service-account`` annotation; buckets are granted to the Google
  service account.

IAM has no emulator, so its calls go through :class:`IamClient`, this plugin's own small
interface: :class:`HttpIamClient` speaks to the IAM and Resource Manager REST APIs with
google-auth, :class:`InMemoryIamClient` is the fake the tests use.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import logging
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import google.auth
import google.auth.credentials
import google.auth.exceptions
import google.auth.transport.requests

from cmbcluster.errors import (
    ConfigurationError,
    Conflict,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    ProviderUnavailable,
)
from cmbcluster.interfaces import CloudIdentity, DnsInfo, InfraProvider, RegistryInfo, RegistryLogin, UserRef
from cmbcluster.naming import dns_label, short_id
from cmbcluster_gcp.rest import IAM_PROPAGATION_SECONDS, GoogleApi, until_propagated
from cmbcluster_gcp.settings import GcpSettings

__all__ = [
    "GSA_ANNOTATION",
    "WORKLOAD_IDENTITY_USER_ROLE",
    "GcpInfra",
    "HttpIamClient",
    "IamClient",
    "InMemoryIamClient",
    "ServiceAccountInfo",
    "workload_identity_principal",
]

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_PREFIX = "cmbcluster-user"
#: Google service account ids are 6-30 characters: "<deployment>-" and as much of the user id as fits.
GSA_ID_MAX = 30
GSA_ANNOTATION = "iam.gke.io/gcp-service-account"
WORKLOAD_IDENTITY_USER_ROLE = "roles/iam.workloadIdentityUser"
#: What marks a Google service account as one user's of one deployment (service accounts have no labels).
GSA_DESCRIPTION = "CMBCluster deployment {deployment}: user {user_id}"
#: ... and as the one user's of the deployments made before deployments had names.
LEGACY_GSA_DESCRIPTION = "CMBCluster user {user_id}"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
REGISTRY_USERNAME = "oauth2accesstoken"

_NAMESPACE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_PROJECT_NUMBER = re.compile(r"^[0-9]{1,20}$")


def workload_identity_principal(project_number: str, pool: str, namespace: str, service_account: str) -> str:
    """The IAM principal of one Kubernetes ServiceAccount under Workload Identity Federation for GKE."""
    return (
        f"principal://iam.googleapis.com/projects/{project_number}/locations/global/"
        f"workloadIdentityPools/{pool}/subject/ns/{namespace}/sa/{service_account}"
    )


# -- the IAM interface ----------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ServiceAccountInfo:
    """A Google service account as IAM reports it."""

    email: str
    unique_id: str = ""
    display_name: str = ""
    description: str = ""


class IamClient(abc.ABC):
    """The few IAM and Resource Manager calls this plugin makes. Errors are :mod:`cmbcluster.errors`."""

    @abc.abstractmethod
    def project_number(self, project_id: str) -> str:
        """The number of project ``project_id`` (Workload Identity principals name projects by number)."""

    @abc.abstractmethod
    def get_service_account(self, email: str) -> ServiceAccountInfo | None:
        """The service account, or None if it does not exist."""

    @abc.abstractmethod
    def create_service_account(
        self, project_id: str, account_id: str, *, display_name: str, description: str
    ) -> ServiceAccountInfo:
        """Create ``<account_id>@<project_id>.iam.gserviceaccount.com``; Conflict if it exists."""

    @abc.abstractmethod
    def delete_service_account(self, email: str) -> None:
        """Delete a service account; one that does not exist is fine."""

    @abc.abstractmethod
    def get_service_account_policy(self, email: str) -> dict[str, Any]:
        """The IAM policy on the service account (who may act as it): ``bindings`` and ``etag``."""

    @abc.abstractmethod
    def set_service_account_policy(self, email: str, policy: dict[str, Any]) -> dict[str, Any]:
        """Replace the policy; Conflict when its ``etag`` is no longer current."""

    def close(self) -> None:  # noqa: B027 - optional hook with a sensible default
        """Release connections."""


class HttpIamClient(IamClient):
    """:class:`IamClient` over the IAM v1 and Resource Manager v3 REST APIs.

    ``credentials`` default to the application default credentials (Workload Identity on
    GKE); ``iam_endpoint`` and ``resource_manager_endpoint`` are the APIs' base URLs. 429, 5xx
    and connection failures are retried with backoff: every call is safe to repeat (a
    repeated create answers 409, a repeated delete 404, a repeated set-policy 409 on its etag,
    and callers handle each).
    """

    def __init__(
        self,
        *,
        credentials: google.auth.credentials.Credentials | None = None,
        iam_endpoint: str = "https://iam.googleapis.com",
        resource_manager_endpoint: str = "https://cloudresourcemanager.googleapis.com",
        attempts: int = 3,
        backoff_seconds: float = 0.5,
        timeout: tuple[float, float] = (5.0, 30.0),
    ) -> None:
        if credentials is None:
            try:
                credentials, _project = google.auth.default(scopes=[CLOUD_PLATFORM_SCOPE])
            except google.auth.exceptions.DefaultCredentialsError as exc:
                raise ConfigurationError(
                    [
                        f"no Google Cloud credentials for IAM ({exc}); run on GKE with Workload Identity "
                        "or set GOOGLE_APPLICATION_CREDENTIALS"
                    ]
                ) from exc
        self.iam_endpoint = iam_endpoint.rstrip("/")
        self.resource_manager_endpoint = resource_manager_endpoint.rstrip("/")
        self._api = GoogleApi(
            credentials, attempts=max(1, attempts), backoff_seconds=backoff_seconds, timeout=timeout,
            service_name="Google Cloud IAM",
            forbidden_hint="the control plane's Google service account may not manage {what} (it needs "
            "roles/iam.serviceAccountAdmin, and resourcemanager.projects.get without PROJECT_NUMBER)",
        )  # fmt: skip

    def _request(self, method: str, url: str, what: str, *, json_body: Any = None) -> dict[str, Any]:
        return self._api.request_url(method, url, what, body=json_body)

    def _account_url(self, email: str, suffix: str = "") -> str:
        return f"{self.iam_endpoint}/v1/projects/-/serviceAccounts/{urllib.parse.quote(email, safe='@')}{suffix}"

    def project_number(self, project_id: str) -> str:
        url = f"{self.resource_manager_endpoint}/v3/projects/{urllib.parse.quote(project_id, safe='')}"
        name = str(self._request("GET", url, f"project {project_id}").get("name", ""))
        number = name.removeprefix("projects/")
        if not _PROJECT_NUMBER.match(number):
            raise ProviderUnavailable(f"Resource Manager answered no project number for {project_id} ({name!r})")
        return number

    def get_service_account(self, email: str) -> ServiceAccountInfo | None:
        try:
            return _account(self._request("GET", self._account_url(email), f"service account {email}"))
        except NotFound:
            return None

    def create_service_account(
        self, project_id: str, account_id: str, *, display_name: str, description: str
    ) -> ServiceAccountInfo:
        url = f"{self.iam_endpoint}/v1/projects/{urllib.parse.quote(project_id, safe='')}/serviceAccounts"
        body = {"accountId": account_id, "serviceAccount": {"displayName": display_name, "description": description}}
        return _account(self._request("POST", url, f"service account {account_id}", json_body=body))

    def delete_service_account(self, email: str) -> None:
        with contextlib.suppress(NotFound):
            self._request("DELETE", self._account_url(email), f"service account {email}")

    def get_service_account_policy(self, email: str) -> dict[str, Any]:
        url = self._account_url(email, ":getIamPolicy")
        return self._request("POST", url, f"IAM policy of service account {email}", json_body={})

    def set_service_account_policy(self, email: str, policy: dict[str, Any]) -> dict[str, Any]:
        url = self._account_url(email, ":setIamPolicy")
        return self._request("POST", url, f"IAM policy of service account {email}", json_body={"policy": policy})

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._api.close()


def _account(body: dict[str, Any]) -> ServiceAccountInfo:
    email = str(body.get("email", ""))
    if "@" not in email:
        raise ProviderUnavailable("Google Cloud IAM answered a service account without an e-mail address")
    return ServiceAccountInfo(
        email=email,
        unique_id=str(body.get("uniqueId", "")),
        display_name=str(body.get("displayName", "")),
        description=str(body.get("description", "")),
    )


@dataclass
class InMemoryIamClient(IamClient):
    """A fake :class:`IamClient` for tests: service accounts and their policies in memory.

    It behaves as IAM does where this plugin relies on it: 409 on creating an existing
    account, etags that change on every policy write and are checked on set.
    """

    project_numbers: dict[str, str] = field(default_factory=dict)
    accounts: dict[str, ServiceAccountInfo] = field(default_factory=dict)
    policies: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _version: int = 0

    def project_number(self, project_id: str) -> str:
        self.calls.append(("project_number", project_id))
        if project_id not in self.project_numbers:
            raise NotFound(f"project {project_id} not found")
        return self.project_numbers[project_id]

    def get_service_account(self, email: str) -> ServiceAccountInfo | None:
        self.calls.append(("get_service_account", email))
        return self.accounts.get(email)

    def create_service_account(
        self, project_id: str, account_id: str, *, display_name: str, description: str
    ) -> ServiceAccountInfo:
        self.calls.append(("create_service_account", account_id))
        email = f"{account_id}@{project_id}.iam.gserviceaccount.com"
        with self._lock:
            if email in self.accounts:
                raise Conflict(f"service account {email} already exists")
            self._version += 1
            info = ServiceAccountInfo(
                email=email, unique_id=str(10**20 + self._version), display_name=display_name, description=description
            )
            self.accounts[email] = info
            self.policies[email] = {"etag": f"BwX{self._version}", "bindings": []}
        return info

    def delete_service_account(self, email: str) -> None:
        self.calls.append(("delete_service_account", email))
        with self._lock:
            self.accounts.pop(email, None)
            self.policies.pop(email, None)

    def get_service_account_policy(self, email: str) -> dict[str, Any]:
        self.calls.append(("get_service_account_policy", email))
        with self._lock:
            if email not in self.policies:
                raise NotFound(f"service account {email} not found")
            return copy.deepcopy(self.policies[email])

    def set_service_account_policy(self, email: str, policy: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("set_service_account_policy", email))
        with self._lock:
            current = self.policies.get(email)
            if current is None:
                raise NotFound(f"service account {email} not found")
            if policy.get("etag") != current["etag"]:
                raise Conflict(f"the IAM policy of service account {email} changed meanwhile")
            self._version += 1
            stored = {"etag": f"BwX{self._version}", "bindings": copy.deepcopy(policy.get("bindings", []))}
            self.policies[email] = stored
            return copy.deepcopy(stored)


# -- the infra provider ---------------------------------------------------------------------------
class GcpInfra(InfraProvider):
    """:class:`~cmbcluster.interfaces.InfraProvider` on GKE (Workload Identity), Artifact Registry, Cloud DNS.

    ``iam`` replaces the IAM client (tests pass :class:`InMemoryIamClient`); by default an
    :class:`HttpIamClient` is made on first use, so a deployment that sets ``PROJECT_NUMBER``
    and uses the default mode never calls IAM at all. ``credentials`` gives the registry login
    its credentials (default: the application default credentials). ``domain`` is the
    deployment's host name when ``DOMAIN`` is not set.
    """

    def __init__(
        self,
        settings: GcpSettings,
        *,
        iam: IamClient | None = None,
        domain: str = "localhost",
        credentials: Callable[[], google.auth.credentials.Credentials] | None = None,
        propagation_seconds: float = IAM_PROPAGATION_SECONDS,
    ) -> None:
        self.settings = settings
        self.domain = domain
        self.propagation_seconds = propagation_seconds
        self._iam = iam
        self._credentials = credentials
        self._project_number = settings.project_number
        self._lock = threading.Lock()

    @property
    def iam(self) -> IamClient:
        with self._lock:
            if self._iam is None:
                self._iam = HttpIamClient(
                    iam_endpoint=self.settings.iam_endpoint,
                    resource_manager_endpoint=self.settings.resource_manager_endpoint,
                )
            return self._iam

    # -- names -------------------------------------------------------------------------------
    @staticmethod
    def service_account_name(user: UserRef) -> str:
        """The user's Kubernetes ServiceAccount: ``cmbcluster-user-<short id>`` (DNS-safe, no e-mail)."""
        return dns_label(SERVICE_ACCOUNT_PREFIX, short_id(user.id))

    def google_service_account_email(self, user: UserRef) -> str:
        """The user's Google service account (``service-account`` mode): ``<deployment>-<user id>``, cut
        to Google's 30 characters (at least 12 of the user id: the deployment's name has 17 at most)."""
        deployment = self.settings.deployment
        account_id = dns_label(deployment, short_id(user.id, GSA_ID_MAX - len(deployment) - 1))
        return f"{account_id}@{self.settings.project_id}.iam.gserviceaccount.com"

    def _descriptions(self, user: UserRef) -> tuple[str, str]:
        return (
            GSA_DESCRIPTION.format(deployment=self.settings.deployment, user_id=user.id),
            LEGACY_GSA_DESCRIPTION.format(user_id=user.id),
        )

    def project_number(self) -> str:
        """PROJECT_NUMBER, or the number Resource Manager gives for PROJECT_ID (looked up once)."""
        if self._project_number is None:
            number = self.iam.project_number(self.settings.project_id)
            if not _PROJECT_NUMBER.match(number):
                raise ProviderUnavailable(f"project {self.settings.project_id} has no valid number ({number!r})")
            self._project_number = number
        return self._project_number

    # -- identity ----------------------------------------------------------------------------
    def ensure_user_identity(self, user: UserRef, *, namespace: str) -> CloudIdentity:
        if not isinstance(namespace, str) or not _NAMESPACE.match(namespace):
            raise InvalidRequest(f"namespace {namespace!r} is not a valid Kubernetes namespace name")
        service_account = self.service_account_name(user)
        pool = self.settings.effective_workload_identity_pool
        if self.settings.identity_mode == "workload-identity":
            principal = workload_identity_principal(self.project_number(), pool, namespace, service_account)
            return CloudIdentity(user=user, principal=principal, service_account=service_account, namespace=namespace)
        email = self._ensure_google_service_account(user)
        self._allow_impersonation(email, f"serviceAccount:{pool}[{namespace}/{service_account}]")
        return CloudIdentity(
            user=user,
            principal=f"serviceAccount:{email}",
            service_account=service_account,
            namespace=namespace,
            annotations={GSA_ANNOTATION: email},
        )

    def _ensure_google_service_account(self, user: UserRef) -> str:
        email = self.google_service_account_email(user)
        description = self._descriptions(user)[0]
        if self._own_account(user, email) is not None:
            return email
        try:
            self.iam.create_service_account(
                self.settings.project_id,
                email.split("@", 1)[0],
                display_name=f"CMBCluster {self.settings.deployment} user {short_id(user.id)}",
                description=description,
            )
        except Conflict:
            if self._own_account(user, email) is None:  # deleted between the two calls
                raise Conflict(f"service account {email} changed while it was being created; try again") from None
            return email
        # IAM is eventually consistent: wait until the new account can be read back, so the
        # policy calls that follow do not answer 404 for it.
        for delay in (0.2, 0.5, 1.0, 2.0):
            if self.iam.get_service_account(email) is not None:
                break
            time.sleep(delay)
        return email

    def _own_account(self, user: UserRef, email: str) -> ServiceAccountInfo | None:
        """The account if it exists (None if not); Conflict if it is not this user's."""
        account = self.iam.get_service_account(email)
        if account is not None and account.description not in self._descriptions(user):
            raise Conflict(f"service account {email} exists but does not belong to this user; not touching it")
        return account

    def _allow_impersonation(self, email: str, member: str) -> None:
        """Bind workloadIdentityUser on ``email`` to exactly ``member``; other roles are kept. A service
        account made moments ago may not be known to its IAM policy yet: that is waited for (IAM's
        propagation window), as any other refusal is not."""
        until_propagated(lambda: self._bind_impersonation(email, member), what=f"service account {email}",
                         window=self.propagation_seconds)  # fmt: skip

    def _bind_impersonation(self, email: str, member: str) -> None:
        for _attempt in range(3):
            policy = self.iam.get_service_account_policy(email)
            bindings = [dict(b) for b in policy.get("bindings") or []]
            kept = [b for b in bindings if b.get("role") != WORKLOAD_IDENTITY_USER_ROLE]
            current = [b for b in bindings if b.get("role") == WORKLOAD_IDENTITY_USER_ROLE]
            if len(current) == 1 and current[0].get("members") == [member] and "condition" not in current[0]:
                return
            wanted = {**policy, "bindings": [*kept, {"role": WORKLOAD_IDENTITY_USER_ROLE, "members": [member]}]}
            try:
                self.iam.set_service_account_policy(email, wanted)
                return
            except Conflict:
                continue  # changed since we read it: read again
        raise Conflict(f"the IAM policy of service account {email} keeps changing; try again")

    def delete_user_identity(self, user: UserRef, *, namespace: str) -> None:
        """``service-account`` mode: delete the user's Google service account. The Kubernetes
        ServiceAccount is the compute backend's; bucket bindings go with the buckets."""
        if self.settings.identity_mode != "service-account":
            return
        email = self.google_service_account_email(user)
        if self._own_account(user, email) is not None:
            self.iam.delete_service_account(email)

    # -- registry and DNS --------------------------------------------------------------------
    def registry(self) -> RegistryInfo:
        """ARTIFACT_REGISTRY, else the deployment's own: ``<region>-docker.pkg.dev/<project>/<deployment>``."""
        configured = self.settings.artifact_registry
        default_prefix = f"{self.settings.project_id}/{self.settings.deployment}"
        if not configured:
            return RegistryInfo(host=f"{self.settings.region}-docker.pkg.dev", repository_prefix=default_prefix)
        parsed = urllib.parse.urlsplit(configured if "://" in configured else f"https://{configured}")
        if not parsed.netloc:
            raise ConfigurationError([f"ARTIFACT_REGISTRY {configured!r} names no registry host"])
        prefix = parsed.path.strip("/") or default_prefix
        return RegistryInfo(host=parsed.netloc, repository_prefix=prefix)

    def registry_login(self) -> RegistryLogin:
        """An OAuth access token, which Artifact Registry takes as the password of ``oauth2accesstoken``:
        GOOGLE_OAUTH_ACCESS_TOKEN when set (as for `cmbcluster infra`), else the credentials' own."""
        given = self.settings.google_oauth_access_token
        if self._credentials is None and given is not None:
            return RegistryLogin(username=REGISTRY_USERNAME, password=given.get_secret_value())
        credentials: Any  # google-auth is untyped
        try:
            if self._credentials is not None:
                credentials = self._credentials()
            else:
                credentials, _project = google.auth.default(scopes=[CLOUD_PLATFORM_SCOPE])
            credentials.refresh(google.auth.transport.requests.Request())
        except google.auth.exceptions.DefaultCredentialsError as exc:
            raise ProviderUnavailable("no Google Cloud credentials are configured", detail=str(exc)) from exc
        except google.auth.exceptions.GoogleAuthError as exc:  # RefreshError, TransportError
            raise ProviderUnavailable("could not get an access token from Google Cloud", detail=str(exc)) from exc
        token = credentials.token
        if not token:
            raise ProviderUnavailable("Google Cloud returned no access token")
        return RegistryLogin(username=REGISTRY_USERNAME, password=str(token))

    def dns(self) -> DnsInfo:
        domain = self.settings.domain or self.domain
        return DnsInfo(domain=domain, environments_domain=domain, zone=self.settings.dns_zone or "")

    # -- operations --------------------------------------------------------------------------
    def check_ready(self) -> None:
        try:
            self.project_number()
        except (NotFound, PermissionDenied, InvalidRequest) as exc:
            raise ProviderUnavailable(f"Google Cloud is not ready: {exc.message}") from exc

    def close(self) -> None:
        if self._iam is not None:
            self._iam.close()
