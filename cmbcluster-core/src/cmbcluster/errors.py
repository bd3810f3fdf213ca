"""The typed errors every provider raises and the API maps to HTTP statuses.

Providers translate their SDK's errors (botocore, google-api-core, kubernetes) into these, so
the control plane never needs to know which cloud it is talking to. Each error reuses the
closest builtin as a second base (as fsspec does with ``FileNotFoundError``), so plain
``except LookupError`` code keeps working. An HTTP status a provider's API answered becomes one
of them through :func:`error_for_status`, the one policy every provider shares.
"""

from __future__ import annotations


class CmbclusterError(Exception):
    """Base of every error CMBCluster raises on purpose. ``http_status`` is what the API answers."""

    http_status: int = 500
    code: str = "internal_error"

    @property
    def server_fault(self) -> bool:
        """Whether the server (or a service it needs) failed, which operators must hear of in the log."""
        return self.http_status >= 500

    def __init__(self, message: str, *, detail: object | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class NotFound(CmbclusterError, LookupError):
    """The object does not exist, or the caller may not learn that it exists."""

    http_status = 404
    code = "not_found"


class AlreadyExists(CmbclusterError):
    """An object of that name already exists."""

    http_status = 409
    code = "already_exists"


class Conflict(CmbclusterError):
    """The request clashes with the object's current state (for example a non-empty bucket)."""

    http_status = 409
    code = "conflict"


class InvalidRequest(CmbclusterError, ValueError):
    """The caller sent something we cannot act on; the message says what."""

    http_status = 400
    code = "invalid_request"


class AuthenticationFailed(CmbclusterError):
    """No valid credentials: a bad, expired or tampered token, or no session."""

    http_status = 401
    code = "authentication_failed"


class PermissionDenied(CmbclusterError, PermissionError):
    """The caller is known but not allowed to do this."""

    http_status = 403
    code = "permission_denied"


class PayloadTooLarge(CmbclusterError):
    """An upload or secret exceeds its configured size limit."""

    http_status = 413
    code = "payload_too_large"


class RequestTimeout(CmbclusterError):
    """The client stopped sending its request's body (an upload, a JSON body) for too long."""

    http_status = 408
    code = "request_timeout"


class InsufficientStorage(CmbclusterError):
    """A storage quota is used up: nothing more can be stored until something is deleted."""

    http_status = 507
    code = "insufficient_storage"

    @property
    def server_fault(self) -> bool:
        return False  # the user's own quota, answered 507 as WebDAV does; nothing for operators to mend


class HeadersTooLarge(CmbclusterError):
    """The request's headers are larger than the server accepts."""

    http_status = 431
    code = "request_header_fields_too_large"


class UnsupportedMediaType(CmbclusterError):
    """A request body in another media type than the route takes (JSON sent as text/plain)."""

    http_status = 415
    code = "unsupported_media_type"


class LimitExceeded(CmbclusterError):
    """A quota or rate limit was hit; ``retry_after`` (seconds) is sent as ``Retry-After``."""

    http_status = 429
    code = "limit_exceeded"

    def __init__(self, message: str, *, retry_after: int | None = None, detail: object | None = None) -> None:
        super().__init__(message, detail=detail)
        self.retry_after = retry_after


class ProviderUnavailable(CmbclusterError):
    """A cloud or cluster service did not answer, or answered with a server error after retries."""

    http_status = 503
    code = "provider_unavailable"


class BadGateway(CmbclusterError):
    """An environment the control plane proxies to did not answer (it stopped, or is still starting)."""

    http_status = 502
    code = "bad_gateway"


class ConfigurationError(CmbclusterError):
    """The configuration is invalid; ``problems`` lists every problem found, one line each."""

    code = "configuration_error"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems

    def __str__(self) -> str:
        return "invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems)


class PluginError(CmbclusterError):
    """A plugin is broken, conflicts with another, or is not installed."""

    code = "plugin_error"


def error_for_status(
    status: int,
    what: str,
    *,
    service: str,
    reason: str = "",
    detail: object | None = None,
    retry_after: int | None = None,
    forbidden: str | None = None,
) -> CmbclusterError:
    """The typed error for an HTTP ``status`` that ``service`` (a cloud API, the Kubernetes API)
    answered about ``what``; ``reason`` is the service's own words, when it gave some.

    One policy for every provider:

    ========================  ====================================================================
    404                       NotFound
    409, 412                  Conflict (it exists already, or changed meanwhile)
    401                       ProviderUnavailable: the control plane's own credentials were refused,
                              an operator's problem, not the caller's
    403                       PermissionDenied (``forbidden``, with ``{what}``, says what to grant)
    413                       PayloadTooLarge
    429                       LimitExceeded with ``retry_after``: the service is rate-limiting the
                              control plane (after the provider's own retries), so the API answers
                              429 with Retry-After and clients try again later
    other 4xx                 InvalidRequest
    5xx, anything else        ProviderUnavailable
    ========================  ====================================================================

    A provider may map its own error codes first (S3's ``SlowDown`` comes with a 503 and stays
    ProviderUnavailable); what only a status says is mapped here.
    """
    said = f": {reason}" if reason else ""
    if status == 404:
        return NotFound(f"{what} not found{said}", detail=detail)
    if status in (409, 412):
        return Conflict(f"{what} already exists or changed meanwhile{said}", detail=detail)
    if status == 401:
        return ProviderUnavailable(f"{service} refused the control plane's credentials{said}", detail=detail)
    if status == 403:
        denied = forbidden.format(what=what) if forbidden else f"{service} does not allow access to {what}"
        return PermissionDenied(f"{denied}{said}", detail=detail)
    if status == 413:
        return PayloadTooLarge(f"{what} is larger than {service} accepts{said}", detail=detail)
    if status == 429:
        return LimitExceeded(f"{service} is rate-limiting requests for {what}{said}", retry_after=retry_after,
                             detail=detail)  # fmt: skip
    if 400 <= status < 500:
        return InvalidRequest(f"{service} refused the request for {what}{said}", detail=detail)
    return ProviderUnavailable(f"{service} failed on {what} (HTTP {status}){said}", detail=detail)


def retry_after_seconds(value: str | None) -> int | None:
    """A ``Retry-After`` header in whole seconds (None when absent or not a number of seconds)."""
    try:
        return max(0, int(value)) if value is not None else None
    except (TypeError, ValueError):
        return None
