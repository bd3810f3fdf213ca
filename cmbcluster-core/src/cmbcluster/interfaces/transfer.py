"""Managed transfers: a cloud's own service copying a bucket from another cloud (Google's Storage
Transfer Service pulls from S3; AWS DataSync reads GCS), offered by a plugin through the hook
``cmbcluster_managed_transfer`` as the bulk path of ``cmbcluster migrate run --managed-transfer``.

Core decides whether to use an offer (the operator's flag) and never trusts what the service
reports: after :meth:`ManagedTransfer.run` returns, core compares both buckets' listings (every
key, its size, and its MD5) and records as verified only the objects that match; a bucket with
any object missing or different is not switched. Without an offer, or without the flag, core's
own streaming copy moves the bucket.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

from cmbcluster.interfaces.storage import StorageBackend


@dataclass(frozen=True, kw_only=True)
class TransferEnd:
    """One end of a bucket's transfer: the storage backend's configured name (``aws``, ``gcp``,
    a third party's), the bucket's real name there, the backend itself, and that provider's
    settings (its pydantic settings model, read from the environment; None for a backend without
    settings)."""

    backend: str
    bucket: str
    storage: StorageBackend
    settings: object | None = None


class ManagedTransfer(abc.ABC):
    """One offered transfer of every object of ``source.bucket`` into ``target.bucket``."""

    #: What the operator reads in the progress display, e.g. "Google Storage Transfer Service".
    service: str = "a managed transfer"

    @abc.abstractmethod
    def run(self, progress: Callable[[int], None] | None = None) -> None:
        """Copy every current object of the source bucket into the target bucket (same keys,
        overwriting what is there), and return once the service reports the job finished.

        Raise :class:`~cmbcluster.errors.ProviderUnavailable` (the service failed or timed out)
        or another :class:`~cmbcluster.errors.CmbclusterError` with what the service said; the
        bucket is then not switched. ``progress``, when given, takes bytes transferred as the
        service reports them. Objects may already be in the target from an earlier run.
        """


#: What a migration asks for each bucket: a plugin's offer for this pair, or None.
TransferOffers = Callable[[TransferEnd, TransferEnd], "ManagedTransfer | None"]
