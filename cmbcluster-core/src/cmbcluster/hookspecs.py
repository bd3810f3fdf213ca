"""Every hook a CMBCluster plugin can implement, in one module.

A plugin is a module (or object) registered under the entry point group ``cmbcluster``::

    [project.entry-points.cmbcluster]
    azure = "cmbcluster_azure.plugin"

whose functions are marked with :data:`cmbcluster.hookimpl`. The four registration hooks
return registrations that core selects **by configured name**; ``cmbcluster_decorate_pod`` is
collected: every implementation runs, in the order documented on it. The rest are optional
answers core asks every plugin for (deployment values, prices, managed transfers). ``docs/plugins/hooks.md``
documents each hook with its exact signature, and a test keeps the two in step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pluggy

from cmbcluster.interfaces import ManagedTransfer, PodContext, PodDraft, PriceTable, TransferEnd
from cmbcluster.registrations import (
    AuthProviderRegistration,
    ComputeBackendRegistration,
    InfraProviderRegistration,
    ResolvedConfig,
    StorageBackendRegistration,
)

PROJECT_NAME = "cmbcluster"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def cmbcluster_storage_backends() -> Iterable[StorageBackendRegistration]:
    """Register storage backends.

    Example::

        @hookimpl
        def cmbcluster_storage_backends():
            yield StorageBackendRegistration(
                name="azure", factory=lambda ctx: BlobStorage(ctx.require_settings(AzureSettings)),
                settings_model=AzureSettings,
            )
    """


@hookspec
def cmbcluster_auth_providers() -> Iterable[AuthProviderRegistration]:
    """Register identity providers users can sign in with (several may be enabled at once)."""


@hookspec
def cmbcluster_infra_providers() -> Iterable[InfraProviderRegistration]:
    """Register infra providers: per-user cloud identity, image registry and DNS."""


@hookspec
def cmbcluster_compute_backends() -> Iterable[ComputeBackendRegistration]:
    """Register compute backends: where environments run."""


@hookspec
def cmbcluster_decorate_pod(draft: PodDraft, context: PodContext) -> None:
    """Change a user pod before it is created; act only where your plugin applies.

    Order: core first adds the storage volumes and the user's identity; then every
    implementation runs in plugin-name order (``tryfirst=True`` implementations before the
    rest, ``trylast=True`` after). Return without change when the pod is not yours
    (``context.serves(name)``: your provider is its storage backend or infra provider).

    Example::

        @hookimpl
        def cmbcluster_decorate_pod(draft, context):
            if context.serves("azure"):
                draft.labels["azure.workload.identity/use"] = "true"
    """


@hookspec
def cmbcluster_deploy_values(config: ResolvedConfig) -> dict[str, Any] | None:
    """Contribute Helm values for ``cmbcluster deploy`` (the chart in ``helm/cmbcluster``).

    Called on every plugin with the validated configuration; return a (nested) dict of values,
    or ``None`` when the deployment is not yours: ask ``config.serves("azure", "storage")`` (or
    ``"infra"``), not whether ``config.settings(...)`` is None, since one settings model is active as
    soon as any of a plugin's concerns is, its sign-in alone included. Results are deep-merged over
    core's values in plugin-name order (``tryfirst``/``trylast`` as for pod decoration); the
    operator's ``--values`` files win over all of them. Never put secrets here: they belong under
    ``secretConfig``.

    Example::

        @hookimpl
        def cmbcluster_deploy_values(config):
            storage, infra = config.serves("azure", "storage"), config.serves("azure", "infra")
            if not (storage or infra):  # azure's sign-in alone, or no azure: nothing for the chart
                return None
            settings = config.require_settings(AzureSettings)
            values = {}
            if infra:
                values["serviceAccount"] = {"annotations": {"azure.workload.identity/client-id": settings.client_id}}
            if storage:
                values["storage"] = {"driver": "blob-csi"}
            return values
    """


@hookspec
def cmbcluster_price_table(config: ResolvedConfig) -> PriceTable | None:
    """Optional: the list prices of your cloud, for usage reports and budgets in money.

    Called on every plugin; return a :class:`~cmbcluster.interfaces.PriceTable` whose ``provider``
    names your infra provider, or ``None``. Core uses the table of the configured infra provider
    (chosen by name), then applies the operator's ``CMBCLUSTER_PRICES``. A plugin without this
    hook gets usage reports in hours and GB-months, without money.

    Example::

        @hookimpl
        def cmbcluster_price_table(config):
            return PriceTable(
                provider="azure", compute=ComputePrice(vcpu_hour=0.048, gib_hour=0.006),
                storage_gb_month={"standard": 0.0184}, cluster_hour=0.10,
                sources=("https://azure.microsoft.com/pricing/details/storage/blobs/",),
                read_on=datetime.date(2026, 11, 1),
            )
    """


@hookspec
def cmbcluster_managed_transfer(source: TransferEnd, target: TransferEnd) -> ManagedTransfer | None:
    """Optional: offer your cloud's managed transfer service for one bucket of a migration.

    Called by ``cmbcluster migrate run --managed-transfer`` for each bucket, on every plugin in
    plugin-name order (``tryfirst``/``trylast`` as for pod decoration); the first offer is used.
    Return a :class:`~cmbcluster.interfaces.ManagedTransfer` when your service can copy
    ``source`` into ``target`` (typically when ``target.backend`` is your storage backend and the
    service reads ``source.backend``), else ``None``: core then streams the bucket itself. Core
    verifies the result from both listings (sizes and MD5s) and switches only a bucket whose
    every object matches; what the service reports is not trusted. For a job started once and
    then polled, subclass :class:`cmbcluster.migration.managed.PolledTransfer` and write only your
    service's calls (start, poll, cleanup).

    Example::

        @hookimpl
        def cmbcluster_managed_transfer(source, target):
            if target.backend != "azure" or source.backend != "aws":
                return None
            return AzureCopyJob(source, target)  # a PolledTransfer (cmbcluster.migration.managed)
    """
