"""What ``down`` keeps unless told: data buckets that still hold objects (database backups)."""

from __future__ import annotations

from collections.abc import Callable

from cmbcluster.errors import Conflict
from cmbcluster.interfaces.provisioning import DeploymentRecord, ProvisioningOptions, ResourceRecord

__all__ = ["data_written_during_down", "refuse_to_delete_data"]


def refuse_to_delete_data(
    record: DeploymentRecord,
    options: ProvisioningOptions,
    *,
    kind: str,
    holds_objects: Callable[[ResourceRecord], bool],
    what: str = "bucket",
) -> None:
    """For :meth:`Provisioner.check_down`: without ``--delete-data``, Conflict before anything is
    deleted when a recorded bucket of ``kind`` still holds objects (``holds_objects``, which
    answers False for a bucket that is gone)."""
    if options.delete_data:
        return
    for bucket in record.find(kind):
        if holds_objects(bucket):
            raise Conflict(
                f"{what} {bucket.id} still holds objects (database backups); nothing was deleted. "
                "Copy what you need, then rerun `down` with --delete-data"
            )


def data_written_during_down(what: str) -> Conflict:
    """The refusal to delete a bucket that received objects after :func:`refuse_to_delete_data` passed."""
    return Conflict(f"{what} holds objects written during `down`; rerun `down` with --delete-data to delete them too")
