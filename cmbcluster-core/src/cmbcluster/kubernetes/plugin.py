"""The built-in ``kubernetes`` compute backend's registration and settings.

Importing this module never imports the ``kubernetes`` client: the factory does, when the
backend is selected (``CMBCLUSTER_COMPUTE_BACKEND=kubernetes``, or any cloud provider).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    ingress_class: str = Field(
        default="nginx", validation_alias=AliasChoices("CMBCLUSTER_INGRESS_CLASS"), description="Ingress class."
    )
    environments_domain: str | None = Field(
        default=None,
        validation_alias=AliasChoices("CMBCLUSTER_ENVIRONMENTS_DOMAIN", "BASE_DOMAIN"),
        description="Domain under which environments are served (host routing); default: path routing.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", validation_alias=AliasChoices("CMBCLUSTER_IMAGE_PULL_POLICY")
    )
    request_timeout_seconds: float = Field(
        default=30, gt=0, validation_alias=AliasChoices("CMBCLUSTER_K8S_REQUEST_TIMEOUT_SECONDS")
    )


Decorator = Callable[[PodDraft, PodContext], None]


def build_backend(ctx: ProviderContext, decorate: Decorator | None = None) -> ComputeBackend:
    """The backend for ``ctx``. ``decorate`` runs the pod-decoration hook on every pod draft:
    by default ``ctx.decorate_pod``, every plugin's ``cmbcluster_decorate_pod``."""
    from cmbcluster.kubernetes.backend import KubernetesCompute, api_client_from_config

    settings = ctx.settings(KubernetesSettings)
    if decorate is None:
        decorate = ctx.decorate_pod
    api_client = api_client_from_config(
        kubeconfig=str(settings.kubeconfig) if settings.kubeconfig else None,
        context=settings.kube_context,
        in_cluster=settings.in_cluster,
    )
    return KubernetesCompute(
        api_client,
        namespace=ctx.core.namespace,  # CMBCLUSTER_NAMESPACE: one setting for every part that needs it
        decorate=decorate,
        storage_backend=ctx.core.selected_storage,
        infra_provider=ctx.core.selected_infra,
        image_pull_policy=settings.image_pull_policy,
        request_timeout=(min(5.0, settings.request_timeout_seconds), settings.request_timeout_seconds),
    )


def _compute(ctx: ProviderContext) -> ComputeBackend:
    return build_backend(ctx)


@hookimpl
def cmbcluster_compute_backends() -> Iterator[ComputeBackendRegistration]:
    yield ComputeBackendRegistration(
        name="kubernetes",
        factory=_compute,
        settings_model=KubernetesSettings,
        description="Pods, Services and Secrets in one Kubernetes namespace",
    )
