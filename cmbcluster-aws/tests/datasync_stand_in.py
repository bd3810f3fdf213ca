"""AWS DataSync as `migrate run --managed-transfer` from Cloud Storage calls it, served by moto's server
in this process in place of moto 5.2's own DataSync (which keeps locations and tasks under a fixed
account, knows no object-storage location and copies nothing). Its executions really copy: they read
Cloud Storage (a gcp-storage-emulator standing in for ``storage.googleapis.com``: :data:`GCS_ENDPOINT`)
and write moto's S3, through the server that took the call, with the credentials of the role the S3
location names (assumed through moto's STS), as DataSync does.

It checks what DataSync checks and what our code relies on, with DataSync's answers
(``InvalidRequestException``; ``AccessDeniedException`` for a denied action):

- CreateLocationObjectStorage: a host name (no scheme, no path), HTTPS or HTTP, a port in 1-65536, a
  bucket name DataSync accepts, the access key and the secret key together, agents that exist
  (:data:`AGENTS`), tags' form;
- CreateLocationS3: an S3 bucket ARN whose bucket exists, a role that exists and whose trust policy
  lets ``datasync.amazonaws.com`` assume it (and ``iam:PassRole`` on it), a storage class DataSync knows;
- CreateTask: locations that exist, a name and options DataSync accepts; Enhanced mode refuses
  POINT_IN_TIME_CONSISTENT and agents on the object-storage location; Basic mode reads another
  cloud's object storage only through an agent;
- executions move QUEUED, LAUNCHING, PREPARING (the HMAC key must be one of :data:`HMAC_KEYS` and the
  bucket exist, else ERROR: Cloud Storage would refuse the listing), TRANSFERRING (objects whose size
  or MD5 differ on the target are copied; ``BytesTransferred`` grows), VERIFYING, SUCCESS. An
  Enhanced mode task that reads object tags from Cloud Storage ends in ERROR at once, as DataSync
  documents; CancelTaskExecution ends an execution in ERROR; a location a task uses is not deleted.

Knobs (module globals, cleared by :func:`reset`): :data:`HMAC_KEYS`, :data:`AGENTS`, :data:`DENIED`
(actions answered AccessDeniedException: ``"datasync:CreateTask"``, ``"iam:PassRole"``),
:func:`fail_next` (one error for an operation: throttling, a 5xx), :data:`DAMAGES` (keys written with
their bytes reversed: a service gone wrong), :data:`HOLD` (cleared: executions wait before
TRANSFERRING), :data:`CALLS` (every call, secrets hidden).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import pytest
from moto.core.exceptions import JsonRESTError
from moto.core.responses import ActionResult, EmptyResult
from moto.datasync.models import datasync_backends
from moto.datasync.responses import DataSyncResponse
from moto.iam.models import iam_backends
from moto.s3.models import s3_backends

#: Where ``storage.googleapis.com`` is served (the GCS emulator's URL; set by the test).
GCS_ENDPOINT: str | None = None
#: Cloud Storage HMAC keys that exist: access ID -> secret.
HMAC_KEYS: dict[str, str] = {}
#: Activated DataSync agents' ARNs.
AGENTS: set[str] = set()
#: Actions answered with AccessDeniedException.
DENIED: set[str] = set()
#: Keys an execution writes with their bytes reversed.
DAMAGES: set[str] = set()
#: Executions wait before TRANSFERRING while this is clear.
HOLD = threading.Event()
#: Every call: (operation, parameters), the secret key hidden.
CALLS: list[tuple[str, dict[str, Any]]] = []
_FAILURES: list[tuple[str, str, int]] = []
_IDS = itertools.count(1)
_LOCK = threading.Lock()

_PARTITION = r"(aws|aws-cn|aws-us-gov|aws-eusc|aws-iso|aws-iso-b)"
_HOSTNAME = re.compile(r"^(([a-zA-Z0-9\-]*[a-zA-Z0-9])\.)*([A-Za-z0-9\-:]*[A-Za-z0-9])$")
_OBJECT_BUCKET = re.compile(r"^[a-zA-Z0-9_\-\+\.\(\)\$\s]{3,63}$")
_S3_BUCKET_ARN = re.compile(rf"^arn:{_PARTITION}:s3:::([a-zA-Z0-9.\-_]{{1,255}})$")
_ROLE_ARN = re.compile(rf"^arn:{_PARTITION}:iam::[0-9]{{12}}:role/.*$")
_AGENT_ARN = re.compile(rf"^arn:{_PARTITION}:datasync:[a-z\-0-9]+:[0-9]{{12}}:agent/agent-[0-9a-z]{{17}}$")
_TAG = re.compile(r"^[a-zA-Z0-9\s+=._:@/-]*$")
_OPTIONS = {
    "VerifyMode": {"POINT_IN_TIME_CONSISTENT", "ONLY_FILES_TRANSFERRED", "NONE"},
    "OverwriteMode": {"ALWAYS", "NEVER"},
    "TransferMode": {"CHANGED", "ALL"},
    "PreserveDeletedFiles": {"PRESERVE", "REMOVE"},
    "ObjectTags": {"PRESERVE", "NONE"},
    "LogLevel": {"OFF", "BASIC", "TRANSFER"},
}
_S3_CLASSES = {"STANDARD", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER", "DEEP_ARCHIVE",
               "OUTPOSTS", "GLACIER_INSTANT_RETRIEVAL"}  # fmt: skip
_RUNNING = ("QUEUED", "LAUNCHING", "PREPARING", "TRANSFERRING", "VERIFYING")


def fail_next(operation: str, code: str, status: int = 400) -> None:
    """Answer the next call of ``operation`` with ``code`` (``ThrottlingException`` 400, ``InternalException`` 500)."""
    _FAILURES.append((operation, code, status))


def reset() -> None:
    for knob in (HMAC_KEYS, AGENTS, DENIED, DAMAGES, CALLS, _FAILURES):
        knob.clear()
    HOLD.set()


@dataclass
class Location:
    arn: str
    kind: str  # "OBJECT_STORAGE" or "S3"
    bucket: str
    params: dict[str, Any]


@dataclass
class Execution:
    arn: str
    task: Task
    status: str = "QUEUED"
    result: dict[str, Any] = field(default_factory=lambda: {"PrepareStatus": "PENDING", "TransferStatus": "PENDING",
                                                             "VerifyStatus": "PENDING"})  # fmt: skip
    counters: dict[str, int] = field(default_factory=dict)
    cancelled: bool = False

    def fail(self, phase: str, code: str, detail: str) -> None:
        self.status = "ERROR"
        self.result.update({f"{phase}Status": "ERROR", "ErrorCode": code, "ErrorDetail": detail})


@dataclass
class Task:
    arn: str
    name: str
    source: Location
    target: Location
    mode: str
    options: dict[str, Any]
    current: Execution | None = None

    @property
    def status(self) -> str:
        return "RUNNING" if self.current is not None and self.current.status in _RUNNING else "AVAILABLE"


@dataclass
class State:
    locations: dict[str, Location] = field(default_factory=dict)
    tasks: dict[str, Task] = field(default_factory=dict)
    executions: dict[str, Execution] = field(default_factory=dict)


def _invalid(message: str) -> JsonRESTError:
    return JsonRESTError("InvalidRequestException", message)


def _hex17() -> str:
    return f"{next(_IDS):017x}"


def _state(self: DataSyncResponse) -> State:
    backend = datasync_backends[self.current_account][self.region]
    state: State = backend.__dict__.setdefault("_cmbcluster_state", State())
    return state


def _begin(self: DataSyncResponse, operation: str, action: str, resource: str = "*") -> dict[str, Any]:
    """Record the call, answer an injected failure, refuse a denied action; the call's parameters."""
    params = dict(self.params)
    CALLS.append((operation, {k: ("***" if k == "SecretKey" else v) for k, v in params.items()}))
    for index, (failing, code, status) in enumerate(_FAILURES):
        if failing == operation:
            del _FAILURES[index]
            error = JsonRESTError(code, f"injected {code}")
            error.code = status
            raise error
    for denied in (action, "iam:PassRole" if operation == "CreateLocationS3" else ""):
        if denied and denied in DENIED:
            raise JsonRESTError(
                "AccessDeniedException",
                f"User: arn:aws:iam::{self.current_account}:user/testing is not authorized to perform: {denied} on "
                f"resource: {resource} because no identity-based policy allows the {denied} action",
            )
    return params


def _check_tags(tags: Any) -> None:
    for tag in tags or []:
        if not (1 <= len(tag.get("Key", "")) <= 256 and _TAG.match(tag["Key"]) and _TAG.match(tag.get("Value", ""))):
            raise _invalid(f"Invalid tag: {tag!r}")


def _add_location(self: DataSyncResponse, kind: str, bucket: str, params: dict[str, Any]) -> ActionResult:
    _check_tags(params.get("Tags"))
    arn = f"arn:aws:datasync:{self.region}:{self.current_account}:location/loc-{_hex17()}"
    with _LOCK:
        _state(self).locations[arn] = Location(arn=arn, kind=kind, bucket=bucket, params=params)
    return ActionResult({"LocationArn": arn})


def _location(state: State, arn: Any, kind: str | None = None) -> Location:
    location = state.locations.get(str(arn))
    if location is None or (kind and location.kind != kind):
        raise _invalid(f"Location {arn} is not found.")
    return location


def create_location_object_storage(self: DataSyncResponse) -> ActionResult:
    p = _begin(self, "CreateLocationObjectStorage", "datasync:CreateLocationObjectStorage")
    host, bucket = str(p.get("ServerHostname", "")), str(p.get("BucketName", ""))
    if not host or len(host) > 255 or not _HOSTNAME.match(host):
        raise _invalid(f"Invalid ServerHostname {host!r}: a host name or IP address, without scheme or path")
    if p.get("ServerProtocol", "HTTPS") not in ("HTTPS", "HTTP"):
        raise _invalid(f"Invalid ServerProtocol {p['ServerProtocol']!r}")
    if not 1 <= int(p.get("ServerPort", 443)) <= 65536:
        raise _invalid(f"Invalid ServerPort {p['ServerPort']!r}")
    if not _OBJECT_BUCKET.match(bucket):
        raise _invalid(f"Invalid BucketName {bucket!r}")
    if ("AccessKey" in p) != ("SecretKey" in p):
        raise _invalid("AccessKey and SecretKey must be specified together")
    agents = p.get("AgentArns")
    if agents is not None:
        if not 1 <= len(agents) <= 8 or not all(_AGENT_ARN.match(a) for a in agents):
            raise _invalid(f"Invalid AgentArns {agents!r}")
        missing = [a for a in agents if a not in AGENTS]
        if missing:
            raise _invalid(f"Agent {missing[0]} is not found.")
    return _add_location(self, "OBJECT_STORAGE", bucket, p)


def create_location_s3(self: DataSyncResponse) -> ActionResult:
    role_arn = str((self.params.get("S3Config") or {}).get("BucketAccessRoleArn", ""))
    p = _begin(self, "CreateLocationS3", "datasync:CreateLocationS3", role_arn or "*")
    matched = _S3_BUCKET_ARN.match(str(p.get("S3BucketArn", "")))
    if not matched:
        raise _invalid(f"Invalid S3BucketArn {p.get('S3BucketArn')!r}")
    bucket = matched.group(2)
    if bucket not in s3_backends[self.current_account]["aws"].buckets:
        raise _invalid(f"DataSync location access test failed: the bucket {bucket} does not exist")
    if not _ROLE_ARN.match(role_arn):
        raise _invalid(f"Invalid BucketAccessRoleArn {role_arn!r}")
    try:
        role = iam_backends[self.current_account]["aws"].get_role_by_arn(role_arn)
    except Exception:
        raise _invalid(f"Unable to assume role {role_arn}: it does not exist") from None
    if not _trusts_datasync(role.assume_role_policy_document):
        raise _invalid(f"Unable to assume role {role_arn}: its trust policy does not allow datasync.amazonaws.com")
    if p.get("S3StorageClass", "STANDARD") not in _S3_CLASSES:
        raise _invalid(f"Invalid S3StorageClass {p['S3StorageClass']!r}")
    return _add_location(self, "S3", bucket, p)


def _trusts_datasync(document: str) -> bool:
    try:
        policy = json.loads(document)
    except ValueError:
        policy = json.loads(urllib.parse.unquote(document))
    for statement in policy.get("Statement", []):
        actions = statement.get("Action", [])
        services = (statement.get("Principal") or {}).get("Service", [])
        actions = [actions] if isinstance(actions, str) else actions
        services = [services] if isinstance(services, str) else services
        if statement.get("Effect") == "Allow" and "sts:AssumeRole" in actions and "datasync.amazonaws.com" in services:
            return True
    return False


def create_task(self: DataSyncResponse) -> ActionResult:
    p = _begin(self, "CreateTask", "datasync:CreateTask")
    state = _state(self)
    source = _location(state, p.get("SourceLocationArn"))
    target = _location(state, p.get("DestinationLocationArn"))
    name = str(p.get("Name", ""))
    if len(name) > 256 or not _TAG.match(name):
        raise _invalid(f"Invalid Name {name!r}")
    options = dict(p.get("Options") or {})
    for option, value in options.items():
        if option in _OPTIONS and value not in _OPTIONS[option]:
            raise _invalid(f"Invalid value {value!r} for Options.{option}")
    mode = str(p.get("TaskMode", "BASIC"))
    agents = source.params.get("AgentArns")
    if mode == "ENHANCED":
        if options.get("VerifyMode") == "POINT_IN_TIME_CONSISTENT":
            raise _invalid("VerifyMode POINT_IN_TIME_CONSISTENT is not supported with Enhanced mode tasks")
        if source.kind == "OBJECT_STORAGE" and agents:
            raise _invalid("Enhanced mode tasks do not use agents: create the object storage location without agents")
        if "iam:CreateServiceLinkedRole" in DENIED:
            raise JsonRESTError("AccessDeniedException", "Enhanced mode needs iam:CreateServiceLinkedRole")
    elif source.kind == "OBJECT_STORAGE" and not agents:
        raise _invalid("Basic mode tasks need an agent to read this object storage location; use Enhanced mode")
    _check_tags(p.get("Tags"))
    arn = f"arn:aws:datasync:{self.region}:{self.current_account}:task/task-{_hex17()}"
    with _LOCK:
        state.tasks[arn] = Task(arn=arn, name=name, source=source, target=target, mode=mode, options=options)
    return ActionResult({"TaskArn": arn})


def _task(state: State, arn: Any) -> Task:
    task = state.tasks.get(str(arn))
    if task is None:
        raise _invalid(f"Task {arn} is not found.")
    return task


def list_tasks(self: DataSyncResponse) -> ActionResult:
    p = _begin(self, "ListTasks", "datasync:ListTasks")
    tasks = list(_state(self).tasks.values())
    start, size = int(p.get("NextToken") or 0), int(p.get("MaxResults") or 100)
    page = [{"TaskArn": t.arn, "Status": t.status, "Name": t.name, "TaskMode": t.mode}
            for t in tasks[start : start + size]]  # fmt: skip
    answer: dict[str, Any] = {"Tasks": page}
    if start + size < len(tasks):
        answer["NextToken"] = str(start + size)
    return ActionResult(answer)


def describe_task(self: DataSyncResponse) -> ActionResult:
    p = _begin(self, "DescribeTask", "datasync:DescribeTask")
    task = _task(_state(self), p.get("TaskArn"))
    answer = {"TaskArn": task.arn, "Status": task.status, "Name": task.name, "SourceLocationArn": task.source.arn,
              "DestinationLocationArn": task.target.arn, "Options": task.options, "TaskMode": task.mode}  # fmt: skip
    if task.current is not None and task.current.status in _RUNNING:
        answer["CurrentTaskExecutionArn"] = task.current.arn
    return ActionResult(answer)


def start_task_execution(self: DataSyncResponse) -> ActionResult:
    p = _begin(self, "StartTaskExecution", "datasync:StartTaskExecution")
    state = _state(self)
    task = _task(state, p.get("TaskArn"))
    with _LOCK:
        if task.status == "RUNNING":  # TaskQueueing would queue it; our code never starts a second
            raise _invalid(f"Task {task.arn} already has a running execution")
        execution = Execution(arn=f"{task.arn}/execution/exec-{_hex17()}", task=task)
        task.current = state.executions[execution.arn] = execution
    endpoint = f"http://{self.headers['Host']}"  # moto's own S3, where DataSync writes
    threading.Thread(target=_execute, args=(execution, endpoint), daemon=True).start()
    return ActionResult({"TaskExecutionArn": execution.arn})


def describe_task_execution(self: DataSyncResponse) -> ActionResult:
    p = _begin(self, "DescribeTaskExecution", "datasync:DescribeTaskExecution")
    execution = _state(self).executions.get(str(p.get("TaskExecutionArn")))
    if execution is None:
        raise _invalid(f"Task execution {p.get('TaskExecutionArn')} is not found.")
    with _LOCK:
        answer = {
            "TaskExecutionArn": execution.arn, "Status": execution.status, "TaskMode": execution.task.mode,
            "Options": execution.task.options, "Result": dict(execution.result), **execution.counters,
        }  # fmt: skip
    return ActionResult(answer)


def cancel_task_execution(self: DataSyncResponse) -> ActionResult:
    p = _begin(self, "CancelTaskExecution", "datasync:CancelTaskExecution")
    execution = _state(self).executions.get(str(p.get("TaskExecutionArn")))
    if execution is None or execution.status not in _RUNNING:
        raise _invalid("Task execution is not running")
    with _LOCK:
        execution.cancelled = True
        execution.fail("Transfer", "OpCancelled", "the execution was cancelled")
    return EmptyResult()


def delete_task(self: DataSyncResponse) -> ActionResult:
    p = _begin(self, "DeleteTask", "datasync:DeleteTask")
    state = _state(self)
    task = _task(state, p.get("TaskArn"))
    with _LOCK:
        if task.current is not None and task.current.status in _RUNNING:
            task.current.cancelled = True
        del state.tasks[task.arn]
    return EmptyResult()


def delete_location(self: DataSyncResponse) -> ActionResult:
    p = _begin(self, "DeleteLocation", "datasync:DeleteLocation")
    state = _state(self)
    location = _location(state, p.get("LocationArn"))
    if any(location in (t.source, t.target) for t in state.tasks.values()):
        raise _invalid(f"Location {location.arn} is used by a task")
    with _LOCK:
        del state.locations[location.arn]
    return EmptyResult()


# -- an execution, in its own thread ---------------------------------------------------------------
def _execute(execution: Execution, s3_endpoint: str) -> None:
    try:
        _run(execution, s3_endpoint)
    except Exception as exc:  # what DataSync would report: the phase that failed and why
        with _LOCK:
            if execution.status in _RUNNING:
                execution.fail("Transfer", "InternalError", f"{type(exc).__name__}: {exc}")


def _step(execution: Execution, status: str) -> bool:
    """Move to ``status`` unless cancelled; a moment passes, so pollers may see it."""
    threading.Event().wait(0.02)
    with _LOCK:
        if execution.cancelled or execution.status not in _RUNNING:
            return False
        execution.status = status
        return True


def _run(execution: Execution, s3_endpoint: str) -> None:
    import boto3
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    task, source, target = execution.task, execution.task.source, execution.task.target
    if not _step(execution, "LAUNCHING"):
        return
    if task.mode == "ENHANCED" and task.options.get("ObjectTags", "PRESERVE") == "PRESERVE":
        with _LOCK:  # documented: Enhanced mode fails at once where the location has no object tags
            execution.fail("Prepare", "ObjectTagsNotSupported", f"{source.params['ServerHostname']} does not "
                           "support object tags: set Options.ObjectTags to NONE")  # fmt: skip
        return
    if not _step(execution, "PREPARING"):
        return
    params = source.params
    if params.get("ServerHostname") != "storage.googleapis.com" or HMAC_KEYS.get(params.get("AccessKey", "")) != (
        params.get("SecretKey")
    ):
        with _LOCK:
            execution.fail("Prepare", "AccessDenied", f"{params.get('ServerHostname')} refused listing bucket "
                           f"{source.bucket}: InvalidAccessKeyId (403)")  # fmt: skip
        return
    assert GCS_ENDPOINT, "set datasync_stand_in.GCS_ENDPOINT to the GCS emulator"
    anonymous: Any = AnonymousCredentials()  # type: ignore[no-untyped-call]
    gcs = storage.Client(project="datasync", credentials=anonymous, client_options={"api_endpoint": GCS_ENDPOINT})
    if gcs.lookup_bucket(source.bucket) is None:
        with _LOCK:
            execution.fail("Prepare", "NoSuchBucket", f"the bucket {source.bucket} does not exist on "
                           f"{params['ServerHostname']}")  # fmt: skip
        return
    blobs = list(gcs.list_blobs(source.bucket))
    sts = boto3.client("sts", endpoint_url=s3_endpoint, region_name="us-east-1",
                       aws_access_key_id="datasync", aws_secret_access_key="datasync")  # fmt: skip
    assumed = sts.assume_role(RoleArn=target.params["S3Config"]["BucketAccessRoleArn"], RoleSessionName="datasync")
    keys = assumed["Credentials"]
    s3 = boto3.client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id=keys["AccessKeyId"],
        aws_secret_access_key=keys["SecretAccessKey"], aws_session_token=keys["SessionToken"],
    )  # fmt: skip
    with _LOCK:
        execution.counters.update(EstimatedFilesToTransfer=len(blobs), EstimatedBytesToTransfer=sum(b.size for b in
                                  blobs), FilesTransferred=0, BytesTransferred=0, BytesWritten=0)  # fmt: skip
        execution.result["PrepareStatus"] = "SUCCESS"
    HOLD.wait()
    if not _step(execution, "TRANSFERRING"):
        return
    for blob in blobs:
        if execution.cancelled:
            return
        md5 = base64.b64decode(blob.md5_hash).hex() if blob.md5_hash else ""
        try:
            there = s3.head_object(Bucket=target.bucket, Key=blob.name)
        except s3.exceptions.ClientError:
            there = None
        if (
            there is not None
            and there["ContentLength"] == blob.size
            and there["ETag"].strip('"') == md5
            and (blob.name not in DAMAGES)
        ):
            continue  # TransferMode CHANGED: the same object is there
        data = blob.download_as_bytes()
        if hashlib.md5(data).hexdigest() != md5:
            raise RuntimeError(f"{blob.name} changed while it was read")
        if blob.name in DAMAGES:
            data = data[::-1]
        storage_class = target.params.get("S3StorageClass", "STANDARD")
        if storage_class == "GLACIER_INSTANT_RETRIEVAL":  # S3's name for it
            storage_class = "GLACIER_IR"
        s3.put_object(Bucket=target.bucket, Key=blob.name, Body=data, StorageClass=storage_class)
        with _LOCK:
            execution.counters["FilesTransferred"] += 1
            execution.counters["BytesTransferred"] += len(data)
            execution.counters["BytesWritten"] += len(data)
    with _LOCK:
        execution.result["TransferStatus"] = "SUCCESS"
    if _step(execution, "VERIFYING") and _step(execution, "SUCCESS"):
        with _LOCK:
            execution.result["VerifyStatus"] = "SUCCESS"
            execution.counters["FilesVerified"] = execution.counters["FilesTransferred"]
    s3.close()
    sts.close()
    gcs.close()


_HANDLERS = (
    create_location_object_storage, create_location_s3, create_task, list_tasks, describe_task, start_task_execution,
    describe_task_execution, cancel_task_execution, delete_task, delete_location,
)  # fmt: skip


def install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve this DataSync from moto (in this process) instead of moto's own."""
    for handler in _HANDLERS:
        monkeypatch.setattr(DataSyncResponse, handler.__name__, handler, raising=False)
    reset()
