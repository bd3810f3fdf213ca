"""One mapping from botocore failures to CMBCluster's typed errors, for every AWS service the
plugin calls (S3, IAM, EKS, ECR, STS, DataSync): AWS's error codes first, then what only the HTTP status
says by core's one policy (:func:`cmbcluster.errors.error_for_status`; a 429 is LimitExceeded)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from cmbcluster.errors import (
    AlreadyExists,
    CmbclusterError,
    Conflict,
    InvalidRequest,
    LimitExceeded,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    ProviderUnavailable,
    error_for_status,
    retry_after_seconds,
)

_NOT_FOUND_CODES = frozenset(
    {
        "NoSuchBucket",
        "NoSuchKey",
        "NoSuchUpload",
        "NoSuchVersion",
        "NotFound",
        "404",
        "NoSuchBucketPolicy",
        "NoSuchEntity",
        "ResourceNotFoundException",
        "RepositoryNotFoundException",
    }
)
_CONFLICT_CODES = frozenset(
    {
        "BucketNotEmpty",
        "PreconditionFailed",
        "412",
        "OperationAborted",
        "InvalidObjectState",
        "DeleteConflict",
        "ConcurrentModification",
        "ResourceInUseException",
    }
)
_EXISTS_CODES = frozenset({"BucketAlreadyExists", "BucketAlreadyOwnedByYou", "EntityAlreadyExists"})
_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",  # the JSON APIs' name for it (DataSync, ECR, EKS), answered with 400
        "403",
        "Forbidden",
        "AllAccessDisabled",
        "AccountProblem",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "KMS.AccessDeniedException",
    }
)
_INVALID_CODES = frozenset(
    {
        "InvalidRange",
        "416",
        "InvalidArgument",
        "InvalidBucketName",
        "KeyTooLongError",
        "MalformedXML",
        "MalformedPolicy",
        "InvalidTag",
        "InvalidStorageClass",
        "InvalidRequest",
        "InvalidPart",
        "InvalidPartOrder",
        "EntityTooSmall",
        "400",
        "MalformedPolicyDocument",
        "ValidationError",
        "InvalidInput",
    }
)
_LIMIT_CODES = frozenset({"LimitExceeded"})
_TOO_LARGE_CODES = frozenset({"EntityTooLarge", "MaxMessageLengthExceeded"})
_UNAVAILABLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "RequestThrottled",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "503",
        "500",
    }
)


def map_aws_error(exc: BaseException, what: str) -> CmbclusterError:
    """The typed CMBCluster error for a botocore failure; ``what`` names the thing acted on."""
    if isinstance(exc, CmbclusterError):
        return exc
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        metadata = exc.response.get("ResponseMetadata", {})
        status = int(metadata.get("HTTPStatusCode") or 0)
        message = str(error.get("Message") or code or "error")
        detail = {"code": code, "status": status}
        text = f"{what}: {message} ({code})" if code else f"{what}: {message}"
        if code in _NOT_FOUND_CODES or (not code and status == 404):
            return NotFound(f"{what} not found", detail=detail)
        if code in _EXISTS_CODES:
            return AlreadyExists(text, detail=detail)
        if code in _CONFLICT_CODES:
            return Conflict(text, detail=detail)
        if code in _DENIED_CODES:
            return PermissionDenied(text, detail=detail)
        if code in _LIMIT_CODES:
            return LimitExceeded(text, detail=detail)
        if code in _TOO_LARGE_CODES:
            return PayloadTooLarge(text, detail=detail)
        if status != 429 and code in _UNAVAILABLE_CODES:  # throttling answered 503 or 400 (SlowDown, Throttling)
            return ProviderUnavailable(f"AWS did not complete the request on {what}: {message}", detail=detail)
        if status != 429 and code in _INVALID_CODES:
            return InvalidRequest(text, detail=detail)
        retry_after = retry_after_seconds((metadata.get("HTTPHeaders") or {}).get("retry-after"))
        reason = f"{message} ({code})" if code else message
        return error_for_status(status, what, service="AWS", reason=reason, detail=detail, retry_after=retry_after)
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return ProviderUnavailable(f"no usable AWS credentials ({what})")
    if isinstance(exc, ParamValidationError):
        return InvalidRequest(f"{what}: {exc}")
    if isinstance(exc, BotoConnectionError):
        return ProviderUnavailable(f"AWS is unreachable ({what}): {exc}")
    if isinstance(exc, BotoCoreError):
        return ProviderUnavailable(f"AWS request failed ({what}): {exc}")
    return ProviderUnavailable(f"AWS request failed ({what}): {exc!r}")


@contextlib.contextmanager
def aws_errors(what: str) -> Iterator[None]:
    """Translate botocore errors raised inside the block; everything else passes untouched."""
    try:
        yield
    except (ClientError, BotoCoreError) as exc:
        raise map_aws_error(exc, what) from exc


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
