"""The typed errors every provider raises and the API maps to HTTP statuses.

Providers translate their SDK's errors (botocore, google-api-core, kubernetes) into these, so
the control plane never needs to know which cloud it is talking to. Each error reuses the
closest builtin as a second base (as fsspec does with ``FileNotFoundError``), so plain
``except LookupError`` code keeps working.
"""

from __future__ import annotations


class CmbclusterError(Exception):
    """Base of every error CMBCluster raises on purpose. ``http_status`` is what the API answers."""

    http_status: int = 500
    code: str = "internal_error"

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


class HeadersTooLarge(CmbclusterError):
    """The request's headers are larger than the server accepts."""

    http_status = 431
    code = "request_header_fields_too_large"


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
        return "Invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems)


class PluginError(CmbclusterError):
    """A plugin is broken, conflicts with another, or is not installed."""

    code = "plugin_error"
