"""The built-in ``kubernetes`` compute backend's registration and settings.

Importing this module never imports the ``kubernetes`` client: the factory does, when the
backend is selected (``CMBCLUSTER_COMPUTE_BACKEND=kubernetes``, or any cloud provider).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cmbcluster.errors import ConfigurationError
from cmbcluster.hookspecs import hookimpl
from cmbcluster.interfaces import ComputeBackend, PodContext, PodDraft
from cmbcluster.registrations import ComputeBackendRegistration, ProviderContext


class KubernetesSettings(BaseSettings):
    """How the control plane reaches the cluster and how environments are exposed."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    kubeconfig: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("CMBCLUSTER_KUBECONFIG", "KUBECONFIG"),
        description="Kubeconfig file; default: in-cluster configuration inside a pod, else ~/.kube/config.",
    )
    kube_context: str | None = Field(
        default=None, validation_alias=AliasChoices("CMBCLUSTER_KUBE_CONTEXT"), description="Kubeconfig context."
    )
    in_cluster: bool | None = Field(
        default=None,
        validation_alias=AliasChoices("CMBCLUSTER_K8S_IN_CLUSTER"),
        description="Force (true) or forbid (false) the in-cluster configuration; default: detect.",
    )
    routing: Literal["ingress", "proxy"] = Field(
        default="proxy",
        validation_alias=AliasChoices("CMBCLUSTER_ROUTING"),
        description="How users reach environments: 'proxy' (through the control plane's own proxy to the pod; "
        "only a Secret and a Pod per environment, any ingress controller) or 'ingress' (an Ingress and a Service "
        "per environment, checked by ingress-nginx's auth-url). Default: proxy, or ingress when "
        "CMBCLUSTER_ENVIRONMENTS_DOMAIN asks for host routing.",
    )
    ingress_class: str = Field(
        default="nginx", validation_alias=AliasChoices("CMBCLUSTER_INGRESS_CLASS"), description="Ingress class."
    )
    environments_domain: str | None = Field(
        default=None,
        validation_alias=AliasChoices("CMBCLUSTER_ENVIRONMENTS_DOMAIN", "BASE_DOMAIN"),
        description="Domain under which environments are served (host routing); default: path routing.",
    )
    tls_secret: str = Field(
        default="cmbcluster-environments-tls",
        validation_alias=AliasChoices("CMBCLUSTER_TLS_SECRET"),
        description="The one wildcard TLS Secret of environment ingresses (cert-manager fills it); empty: no TLS.",
    )
    control_plane_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("CMBCLUSTER_CONTROL_PLANE_URL"),
        description="The control plane as the ingress controller reaches it, for the auth-url check; "
        "default: http://cmbcluster.<namespace>.svc.cluster.local.",
    )
    ingress_namespace: str = Field(
        default="ingress-nginx",
        validation_alias=AliasChoices("CMBCLUSTER_INGRESS_NAMESPACE"),
        description="Namespace of the ingress controller: the only one whose traffic reaches user pods.",
    )
    ingress_annotations: dict[str, str] = Field(
        default_factory=dict,
        validation_alias=AliasChoices("CMBCLUSTER_INGRESS_ANNOTATIONS"),
        description="Extra annotations on every environment Ingress (JSON object).",
    )
    leader_election: Literal["auto", "on", "off"] = Field(
        default="auto",
        validation_alias=AliasChoices("CMBCLUSTER_LEADER_ELECTION"),
        description="Elect one replica for the background loops through a Lease; auto: on with an external "
        "database (several replicas possible), off with SQLite (one replica).",
    )
    lease_seconds: float = Field(
        default=15, ge=3, le=300, validation_alias=AliasChoices("CMBCLUSTER_LEASE_SECONDS"),
        description="How long a dead leader's Lease holds before another replica takes over.",
    )  # fmt: skip
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", validation_alias=AliasChoices("CMBCLUSTER_IMAGE_PULL_POLICY"),
        description="imagePullPolicy of environment pods: Always (re-pull a changed tag at each start), "
        "IfNotPresent, or Never (images preloaded on the nodes).",
    )  # fmt: skip
    request_timeout_seconds: float = Field(
        default=30, gt=0, validation_alias=AliasChoices("CMBCLUSTER_K8S_REQUEST_TIMEOUT_SECONDS"),
        description="How long one Kubernetes API call may take (connecting: at most 5 s of it) before it is "
        "retried with backoff, 5 attempts in all.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _one_routing(self) -> KubernetesSettings:
        if "routing" not in self.model_fields_set and self.environments_domain:
            # Host routing is the ingress's alone; a deployment that names only its domain (as
            # BASE_DOMAIN did before the proxy existed) keeps working.
            self.routing = "ingress"
            self.model_fields_set.discard("routing")  # still the default: `deploy` leaves it to the chart's
        if self.routing == "proxy" and self.environments_domain:
            raise ValueError(
                "CMBCLUSTER_ROUTING=proxy serves environments at <public url>/environments/<id>/: unset "
                "CMBCLUSTER_ENVIRONMENTS_DOMAIN (host routing needs CMBCLUSTER_ROUTING=ingress)"
            )
        return self

    def config_notes(self) -> list[str]:
        """What `cmbcluster config check` tells about these settings: how users reach environments."""
        where = "/environments/<id>/ of the public URL"
        if self.routing == "proxy":
            how = f"proxy routing, served by the control plane at {where}"
        elif self.environments_domain:
            how = f"ingress routing, each on a host of its own: env-<id>.{self.environments_domain.strip('.')}"
        else:
            how = f"ingress routing, through the ingress controller at {where}"
        if "routing" not in self.model_fields_set:
            how += f" (the default {'with' if self.environments_domain else 'without'} an environments domain)"
        return [f"environments: {how}"]


Decorator = Callable[[PodDraft, PodContext], None]


def build_backend(ctx: ProviderContext, decorate: Decorator | None = None) -> ComputeBackend:
    """The backend for ``ctx``. ``decorate`` runs the pod-decoration hook on every pod draft:
    by default ``ctx.decorate_pod``, every plugin's ``cmbcluster_decorate_pod``."""
    try:
        from kubernetes.config import ConfigException
    except ImportError:  # what this machine lacks: say what to install
        raise ConfigurationError(
            ["compute backend 'kubernetes' needs the kubernetes client, not installed here: "
             "pip install 'cmbcluster-core[kubernetes]' (the cloud plugins bring it)"]
        ) from None  # fmt: skip

    from cmbcluster.kubernetes.backend import KubernetesCompute, KubernetesOptions, LeaderElection
    from cmbcluster.kubernetes.client import Retries, api_client_from_config
    from cmbcluster.kubernetes.routing import Exposure

    settings = ctx.require_settings(KubernetesSettings)
    try:
        api_client = api_client_from_config(
            kubeconfig=str(settings.kubeconfig) if settings.kubeconfig else None,
            context=settings.kube_context,
            in_cluster=settings.in_cluster,
        )
    except (ConfigException, OSError) as exc:  # what this machine lacks, not a fault of the backend
        raise ConfigurationError(
            [f"compute backend 'kubernetes' could not be created: no cluster to reach from here ({exc}); set "
             "CMBCLUSTER_KUBECONFIG (or KUBECONFIG) and CMBCLUSTER_KUBE_CONTEXT, or run inside the cluster"]
        ) from None  # fmt: skip
    namespace = ctx.core.namespace  # CMBCLUSTER_NAMESPACE: one setting for every part that needs it
    control_plane = settings.control_plane_url or f"http://cmbcluster.{namespace}.svc.cluster.local"
    exposure = Exposure(
        routing=settings.routing,
        ingress_class=settings.ingress_class,
        environments_domain=settings.environments_domain or None,
        public_url=ctx.core.public_url,
        tls_secret=settings.tls_secret or None,
        auth_url=f"{control_plane.rstrip('/')}/api/v1/environments/authorize",
        ingress_namespace=settings.ingress_namespace,
        extra_annotations=settings.ingress_annotations,
    )
    timeout = settings.request_timeout_seconds
    options = KubernetesOptions(
        namespace=namespace,
        exposure=exposure,
        image_pull_policy=settings.image_pull_policy,
        retries=Retries(request_timeout=(min(5.0, timeout), timeout)),
        leader_election=(
            LeaderElection(identity=_replica_identity(), lease_seconds=settings.lease_seconds)
            if _elects_leader(settings, ctx)
            else None
        ),
        storage_backend=ctx.core.selected_storage,
        infra_provider=ctx.core.selected_infra,
        active_settings=ctx.active_settings,
    )
    return KubernetesCompute(api_client, options, decorate=ctx.decorate_pod if decorate is None else decorate)


def _elects_leader(settings: KubernetesSettings, ctx: ProviderContext) -> bool:
    if settings.leader_election != "auto":
        return settings.leader_election == "on"
    url = ctx.core.database_url or ""
    return bool(url) and not url.startswith("sqlite")


def _replica_identity() -> str:
    """Unique per process: the pod's name (HOSTNAME in a pod), the pid and a random part."""
    import os
    import secrets
    import socket

    return f"{os.environ.get('HOSTNAME') or socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@hookimpl
def cmbcluster_compute_backends() -> Iterator[ComputeBackendRegistration]:
    yield ComputeBackendRegistration(
        name="kubernetes",
        factory=build_backend,
        settings_model=KubernetesSettings,
        description="Pods, Services and Secrets in one Kubernetes namespace",
    )
