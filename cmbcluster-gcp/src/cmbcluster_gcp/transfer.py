"""Google's Storage Transfer Service as the bulk path of ``cmbcluster migrate run --managed-transfer``
from S3 to Cloud Storage: the service reads the S3 bucket itself, so terabytes do not pass through
the control plane. Core verifies the result from both listings afterwards (see
:mod:`cmbcluster.interfaces.transfer`); nothing the service reports is trusted.

One bucket is one transfer job: ``transferJobs.create`` (an ``awsS3DataSource`` and a
``gcsDataSink``, no schedule, so it runs only when asked), ``transferJobs.run``, then the returned
``transferOperations`` operation is polled until done; the job is deleted afterwards (the polling,
progress, timeout and cleanup are core's :class:`~cmbcluster.migration.managed.PolledTransfer`). Calls go
through :class:`~cmbcluster_gcp.rest.GoogleApi` (``GOOGLE_API_ENDPOINT`` in tests; 429/5xx
retried). The job is named by us, so a create repeated after a lost answer finds it (409) rather
than making a second one.

The service reads S3 with what the job carries: a role ARN it assumes through web identity
federation (``STORAGE_TRANSFER_AWS_ROLE_ARN``, preferred) or a long-lived access key
(``STORAGE_TRANSFER_AWS_ACCESS_KEY_ID`` / ``..._SECRET_ACCESS_KEY``); temporary credentials with
a session token are not accepted by the API.
"""

from __future__ import annotations

import uuid
from typing import Any

from cmbcluster.errors import ConfigurationError, Conflict, ProviderUnavailable
from cmbcluster.migration.managed import PolledTransfer, TransferStatus
from cmbcluster_gcp.provisioning import credentials_for
from cmbcluster_gcp.rest import GoogleApi
from cmbcluster_gcp.settings import GcpSettings

SERVICE = "storagetransfer"
#: The operation's states that end it (TransferOperation.Status); SUCCESS is the only good one.
FINAL_STATES = frozenset({"SUCCESS", "FAILED", "ABORTED"})


def aws_source_credentials(settings: GcpSettings) -> dict[str, Any]:
    """The ``awsS3DataSource`` fields that let the service read S3: ``roleArn`` or ``awsAccessKey``."""
    if settings.storage_transfer_aws_role_arn:
        return {"roleArn": settings.storage_transfer_aws_role_arn}
    if settings.storage_transfer_aws_access_key_id and settings.storage_transfer_aws_secret_access_key:
        return {"awsAccessKey": {
            "accessKeyId": settings.storage_transfer_aws_access_key_id,
            "secretAccessKey": settings.storage_transfer_aws_secret_access_key.get_secret_value(),
        }}  # fmt: skip
    raise ConfigurationError(
        ["--managed-transfer from S3 to Cloud Storage: Storage Transfer Service reads the S3 buckets itself and "
         "needs AWS credentials of its own: set STORAGE_TRANSFER_AWS_ROLE_ARN (a role trusting Google's transfer "
         "service account; see docs/operators/migration.md) or STORAGE_TRANSFER_AWS_ACCESS_KEY_ID and "
         "STORAGE_TRANSFER_AWS_SECRET_ACCESS_KEY; or run without --managed-transfer to stream the copy"]
    )  # fmt: skip


class StorageTransferJob(PolledTransfer):
    """Copies ``s3://source_bucket`` into ``gs://target_bucket`` with one Storage Transfer job
    (the waiting, progress, timeout and cleanup: :class:`~cmbcluster.migration.managed.PolledTransfer`)."""

    service = "Google Storage Transfer Service"

    def __init__(
        self,
        settings: GcpSettings,
        source_bucket: str,
        target_bucket: str,
        *,
        api: GoogleApi | None = None,
        poll_interval: float = 10.0,
        timeout: float = 7 * 24 * 3600.0,
    ) -> None:
        self.settings = settings
        self.source_bucket, self.target_bucket = source_bucket, target_bucket
        self.credentials = aws_source_credentials(settings)  # checked before anything is called
        self._api = api
        self.poll_interval = poll_interval
        self.timeout = timeout
        self._job: str | None = None
        self._operation: str | None = None

    @property
    def api(self) -> GoogleApi:
        if self._api is None:
            self._api = GoogleApi(
                credentials_for(self.settings), endpoint=self.settings.google_api_endpoint,
                service_name="Google Storage Transfer Service",
                forbidden_hint="roles/storagetransfer.user on the project (and the service's own account "
                "roles/storage.admin on the target bucket)",
            )  # fmt: skip
        return self._api

    @property
    def what(self) -> str:
        return f"the transfer of s3://{self.source_bucket} to gs://{self.target_bucket}"

    def start(self) -> TransferStatus:
        project = self.settings.project_id
        job = f"transferJobs/cmbcluster-{uuid.uuid4().hex}"
        body = {
            "name": job,
            "projectId": project,
            "description": f"cmbcluster migrate: s3://{self.source_bucket} -> gs://{self.target_bucket}",
            "status": "ENABLED",
            "transferSpec": {
                "awsS3DataSource": {"bucketName": self.source_bucket, **self.credentials},
                "gcsDataSink": {"bucketName": self.target_bucket},
                # objects already copied by an earlier run are skipped; changed ones are overwritten
                "transferOptions": {"overwriteWhen": "DIFFERENT"},
            },
        }
        try:
            self.api.request("POST", SERVICE, "v1/transferJobs", self.what, body=body)
        except Conflict:  # our own create, repeated after its answer was lost
            pass
        self._job = job
        operation = self.api.request("POST", SERVICE, f"v1/{job}:run", self.what, body={"projectId": project})
        self._operation = operation.get("name")
        if not self._operation:
            raise ProviderUnavailable(f"Storage Transfer Service answered no operation name for {self.what}")
        return status_of(operation)

    def poll(self) -> TransferStatus:
        return status_of(self.api.request("GET", SERVICE, f"v1/{self._operation}", self.what))

    def cleanup(self, status: TransferStatus | None) -> None:
        """Delete the job (its operations' history stays in the console); a job left behind never
        runs again (it has no schedule)."""
        if self._job is None:
            return
        body = {"projectId": self.settings.project_id, "updateTransferJobFieldMask": "status",
                "transferJob": {"status": "DELETED"}}  # fmt: skip
        self.api.request("PATCH", SERVICE, f"v1/{self._job}", f"deleting {self._job}", body=body)

    def close(self) -> None:
        if self._api is not None:
            self._api.close()
            self._api = None


def status_of(operation: dict[str, Any]) -> TransferStatus:
    """A ``transferOperations`` operation as a :class:`TransferStatus`: done when the operation says
    so or its status is final; only SUCCESS without an error succeeded; the failure's reason is the
    service's error breakdown (or the operation's error)."""
    metadata = operation.get("metadata") or {}
    state = str(metadata.get("status") or "IN_PROGRESS")
    copied = int((metadata.get("counters") or {}).get("bytesCopiedToSink") or 0)
    done = bool(operation.get("done")) or state in FINAL_STATES
    error = operation.get("error")
    if not done:
        return TransferStatus(state=state, bytes_transferred=copied)
    if not error and state == "SUCCESS":
        return TransferStatus(state=state, done=True, succeeded=True, bytes_transferred=copied)
    breakdowns = metadata.get("errorBreakdowns") or []
    detail = "; ".join(
        f"{b.get('errorCode')}: " + ", ".join(str((e.get("errorDetails") or [""])[0])
                                              for e in b.get("errorLogEntries", []))
        for b in breakdowns
    ) or (error.get("message") if isinstance(error, dict) else None) or f"status {state}"  # fmt: skip
    return TransferStatus(state=state, done=True, bytes_transferred=copied, error=detail)
