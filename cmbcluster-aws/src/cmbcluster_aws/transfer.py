"""AWS DataSync as the bulk path of ``cmbcluster migrate run --managed-transfer`` from Cloud Storage
to S3: DataSync reads the GCS bucket through Cloud Storage's S3-compatible XML API
(``storage.googleapis.com``, with an HMAC key) and writes the S3 bucket itself, so terabytes do not
pass through the control plane. Core verifies the result from both listings afterwards (nothing
DataSync reports is trusted); the polling, progress, timeout and cleanup are core's
:class:`~cmbcluster.migration.managed.PolledTransfer`. This module holds DataSync's calls only.

One bucket is one DataSync task:

1. ``CreateLocationObjectStorage``: the GCS bucket at ``storage.googleapis.com`` over HTTPS (443),
   read with the HMAC key (``DATASYNC_GCS_HMAC_ACCESS_ID``/``_SECRET``), through the agents of
   ``DATASYNC_AGENT_ARNS`` if any;
2. ``CreateLocationS3``: the new bucket, written with the role DataSync assumes
   (``DATASYNC_S3_ROLE_ARN``), in the bucket's storage class;
3. ``CreateTask``: Enhanced mode without agents (DataSync reads other clouds without an agent only
   in that mode), Basic mode with them; objects that differ are copied over what is there
   (``TransferMode`` CHANGED, ``OverwriteMode`` ALWAYS), nothing is deleted on the target, object
   tags are not read (Cloud Storage's XML API has none, and an Enhanced mode task that asks for them
   fails), and DataSync checks what it transferred (``VerifyMode`` ONLY_FILES_TRANSFERRED, the one
   both modes support); named after the bucket pair and tagged ``cmbcluster:migration``;
4. ``StartTaskExecution``, then ``DescribeTaskExecution`` until SUCCESS or ERROR (the failure's
   reason is its ``Result``: the phase, error code and detail);
5. the task and both locations are deleted (the HMAC secret is stored in the source location until
   then); an execution still running when ``migrate`` stops waiting is cancelled first.

A task is found again by its name: a run interrupted while DataSync copied (SIGKILL, a lost SSH
session) finds the execution it left and waits for it instead of starting another, and every task
of that name is deleted at the end, a twin made by a retried create included. Calls go through the
plugin's boto3 client (standard retries: throttling and 5xx are retried, a refusal is not); an
``AccessDeniedException`` becomes PermissionDenied naming the permission the caller lacks.
"""

from __future__ import annotations

import logging
from typing import Any

from botocore import xform_name
from botocore.exceptions import BotoCoreError, ClientError

from cmbcluster.errors import CmbclusterError, ConfigurationError, PermissionDenied
from cmbcluster.interfaces import StorageBackend
from cmbcluster.migration.managed import PolledTransfer, TransferStatus
from cmbcluster_aws.clients import close_clients, make_clients
from cmbcluster_aws.errors import map_aws_error
from cmbcluster_aws.names import partition_of
from cmbcluster_aws.settings import AwsSettings
from cmbcluster_aws.storage import S3_STORAGE_CLASSES

log = logging.getLogger(__name__)

#: Cloud Storage's XML API, which speaks S3's protocol and takes HMAC keys.
GCS_HOST = "storage.googleapis.com"
TAG_KEY = "cmbcluster:migration"
#: A task's statuses while one of its executions runs (ListTasks).
TASK_RUNNING = frozenset({"QUEUED", "RUNNING"})
#: An execution's statuses that end it (DescribeTaskExecution); SUCCESS is the only good one.
EXECUTION_DONE = frozenset({"SUCCESS", "ERROR"})
#: What the task does with objects (see the module).
TASK_OPTIONS = {
    "VerifyMode": "ONLY_FILES_TRANSFERRED",
    "TransferMode": "CHANGED",
    "OverwriteMode": "ALWAYS",
    "PreserveDeletedFiles": "PRESERVE",
    "ObjectTags": "NONE",
}
#: S3's storage class names where DataSync's differ (the rest are the same).
DATASYNC_CLASSES = {"GLACIER_IR": "GLACIER_INSTANT_RETRIEVAL"}


def datasync_problems(settings: AwsSettings) -> list[str]:
    """What ``--managed-transfer`` from Cloud Storage lacks in the settings, one line each."""
    problems = []
    if settings.datasync_gcs_hmac_access_id is None or settings.datasync_gcs_hmac_secret is None:
        problems.append(
            "--managed-transfer from Cloud Storage: AWS DataSync reads the GCS buckets through their "
            "S3-compatible API with an HMAC key: set DATASYNC_GCS_HMAC_ACCESS_ID and DATASYNC_GCS_HMAC_SECRET "
            "(a key of a service account that reads the buckets; see docs/operators/migration.md)"
        )
    if settings.datasync_s3_role_arn is None:
        problems.append(
            "--managed-transfer from Cloud Storage: AWS DataSync writes the S3 buckets with a role it assumes: "
            "set DATASYNC_S3_ROLE_ARN (a role trusting datasync.amazonaws.com; see docs/operators/migration.md)"
        )
    if problems:
        problems.append("or run without --managed-transfer to stream the copy")
    return problems


class DataSyncTransfer(PolledTransfer):
    """Copies ``gs://source_bucket`` into ``s3://target_bucket`` with one DataSync task (see the module).

    ``target_storage`` (the S3 backend) gives the new bucket's storage class; ``client`` a DataSync
    client (tests), else the plugin's own is made.
    """

    service = "AWS DataSync"

    def __init__(
        self,
        settings: AwsSettings,
        source_bucket: str,
        target_bucket: str,
        *,
        target_storage: StorageBackend | None = None,
        client: Any = None,
        poll_interval: float = 10.0,
        timeout: float = 7 * 24 * 3600.0,
    ) -> None:
        problems = datasync_problems(settings)  # checked before anything is called
        if problems:
            raise ConfigurationError(problems)
        self.settings = settings
        self.source_bucket, self.target_bucket = source_bucket, target_bucket
        self.target_storage = target_storage
        self._client = client
        self.poll_interval = poll_interval
        self.timeout = timeout
        self._execution: str | None = None
        self._made: list[str] = []  # the locations this run made (deleted at the end)

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_clients(self.settings, ["datasync"])["datasync"]
        return self._client

    @property
    def what(self) -> str:
        return f"the transfer of gs://{self.source_bucket} to s3://{self.target_bucket}"

    @property
    def name(self) -> str:
        """The task's name, which finds it again: one task per bucket pair."""
        return f"cmbcluster-{self.source_bucket}-to-{self.target_bucket}"

    # -- PolledTransfer ---------------------------------------------------------------------------
    def start(self) -> TransferStatus:
        for task in self._tasks():
            if task.get("Status") in TASK_RUNNING:
                current = self._call("DescribeTask", "reading its task", TaskArn=task["TaskArn"])
                if current.get("CurrentTaskExecutionArn"):
                    log.info("%s: waiting for the execution an earlier run started", self.what)
                    self._execution = str(current["CurrentTaskExecutionArn"])
                    return self.poll()
        self._delete_tasks()  # what an earlier run left, with credentials it stored
        settings = self.settings
        assert settings.datasync_gcs_hmac_access_id and settings.datasync_gcs_hmac_secret  # datasync_problems
        assert settings.datasync_s3_role_arn
        tags = [{"Key": TAG_KEY, "Value": self.name}]
        agents = settings.datasync_agents
        through: dict[str, Any] = {"AgentArns": agents} if agents else {}
        source = self._call(
            "CreateLocationObjectStorage", f"making the location of gs://{self.source_bucket}",
            ServerHostname=GCS_HOST, ServerProtocol="HTTPS", ServerPort=443, BucketName=self.source_bucket,
            AccessKey=settings.datasync_gcs_hmac_access_id,
            SecretKey=settings.datasync_gcs_hmac_secret.get_secret_value(),
            Tags=tags, **through,
        )["LocationArn"]  # fmt: skip
        self._made.append(source)
        role = settings.datasync_s3_role_arn
        target = self._call(
            "CreateLocationS3", f"making the location of s3://{self.target_bucket}",
            permissions=f"datasync:CreateLocationS3 and iam:PassRole on {role}",
            S3BucketArn=f"arn:{partition_of(settings.aws_region)}:s3:::{self.target_bucket}",
            S3Config={"BucketAccessRoleArn": role}, S3StorageClass=self._storage_class(), Tags=tags,
        )["LocationArn"]  # fmt: skip
        self._made.append(target)
        mode = "BASIC" if agents else "ENHANCED"
        task = self._call(
            "CreateTask", f"making the task {self.name}",
            permissions="datasync:CreateTask" + ("" if agents else " and, once per account for Enhanced mode, "
                                                 "iam:CreateServiceLinkedRole"),
            SourceLocationArn=source, DestinationLocationArn=target, Name=self.name, TaskMode=mode,
            Options=TASK_OPTIONS, Tags=tags,
        )["TaskArn"]  # fmt: skip
        started = self._call("StartTaskExecution", f"starting the task {self.name}", TaskArn=task)
        self._execution = str(started["TaskExecutionArn"])
        return TransferStatus(state="QUEUED")

    def poll(self) -> TransferStatus:
        answer = self._call("DescribeTaskExecution", "reading its execution", TaskExecutionArn=self._execution)
        state = str(answer.get("Status") or "")
        copied = int(answer.get("BytesTransferred") or 0)
        if state not in EXECUTION_DONE:
            return TransferStatus(state=state, bytes_transferred=copied)
        if state == "SUCCESS":
            return TransferStatus(state=state, done=True, succeeded=True, bytes_transferred=copied)
        return TransferStatus(state=state, done=True, bytes_transferred=copied, error=_reason(answer))

    def cleanup(self, status: TransferStatus | None) -> None:
        """Cancel an execution still running, then delete every task of ours and the locations;
        each step is tried, the first failure raised (core logs it)."""
        failures: list[CmbclusterError] = []
        if self._execution is not None and (status is None or not status.done):
            try:
                self._call("CancelTaskExecution", "cancelling its execution", TaskExecutionArn=self._execution)
            except CmbclusterError as exc:
                failures.append(exc)
        try:
            self._delete_tasks()
        except CmbclusterError as exc:
            failures.append(exc)
        for location in self._made:
            try:
                self._call("DeleteLocation", f"deleting the location {location}", LocationArn=location)
            except CmbclusterError as exc:
                failures.append(exc)
        self._made.clear()
        if failures:
            raise failures[0]

    def close(self) -> None:
        if self._client is not None:
            close_clients([self._client])
            self._client = None

    # -- DataSync's calls -------------------------------------------------------------------------
    def _call(self, operation: str, what: str, *, permissions: str | None = None, **params: Any) -> dict[str, Any]:
        """One DataSync call, its failure mapped; a refusal says which permission to grant."""
        try:
            answer: dict[str, Any] = getattr(self.client, xform_name(operation))(**params)
        except (ClientError, BotoCoreError) as exc:
            error = map_aws_error(exc, f"AWS DataSync, {what} for {self.what}")
            if isinstance(error, PermissionDenied):
                raise PermissionDenied(
                    f"{error.message}. The identity running `cmbcluster migrate` needs "
                    f"{permissions or 'datasync:' + operation} (all it needs: docs/operators/migration.md)",
                    detail=error.detail,
                ) from exc
            raise error from exc
        return answer

    def _tasks(self) -> list[dict[str, Any]]:
        """The tasks named ours (ListTasks has no filter by name)."""
        found: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            page = self._call("ListTasks", "listing tasks", MaxResults=100, **({"NextToken": token} if token else {}))
            found += [t for t in page.get("Tasks", []) if t.get("Name") == self.name]
            token = page.get("NextToken")
            if not token:
                return found

    def _delete_tasks(self) -> None:
        """Delete every task named ours and the locations it reads and writes."""
        for task in self._tasks():
            described = self._call("DescribeTask", "reading its task", TaskArn=task["TaskArn"])
            self._call("DeleteTask", f"deleting the task {task['TaskArn']}", TaskArn=task["TaskArn"])
            for key in ("SourceLocationArn", "DestinationLocationArn"):
                location = described.get(key)
                if location:
                    self._call("DeleteLocation", f"deleting the location {location}", LocationArn=location)
                    if location in self._made:
                        self._made.remove(location)

    def _storage_class(self) -> str:
        """The class DataSync writes objects in: the one the new bucket was made with (S3Storage
        tags it on the bucket), standard when unknown."""
        if self.target_storage is None:
            return "STANDARD"
        s3_class = S3_STORAGE_CLASSES.get(self.target_storage.get_bucket(self.target_bucket).storage_class, "STANDARD")
        return DATASYNC_CLASSES.get(s3_class, s3_class)


def _reason(execution: dict[str, Any]) -> str:
    """Why an execution ended in ERROR, from its Result (the failed phase, error code and detail)
    and, in Enhanced mode, how many objects failed in each phase."""
    result = execution.get("Result") or {}
    phase = next((p for p in ("Prepare", "Transfer", "Verify") if result.get(f"{p}Status") == "ERROR"), None)
    reason = ": ".join(str(part) for part in (result.get("ErrorCode"), result.get("ErrorDetail")) if part)
    text = f"{phase.lower()} phase: " if phase else ""
    text += reason or "DataSync gave no reason"
    failed = {k: v for k, v in (execution.get("FilesFailed") or {}).items() if v}
    if failed:
        text += " (objects failed: " + ", ".join(f"{v} to {k.lower()}" for k, v in failed.items()) + ")"
    return text
