"""One mapping from Google's failures to CMBCluster's typed errors, for every Google API the plugin
calls: the JSON REST APIs (:class:`~cmbcluster_gcp.rest.GoogleApi`: Compute, Container, Artifact
Registry, Cloud DNS, IAM, Resource Manager) and Cloud Storage through google-cloud-storage. An HTTP
status follows core's one policy (:func:`cmbcluster.errors.error_for_status`); the client
libraries' own exceptions (google-api-core, google-auth, resumable-media, requests) are mapped here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import google.auth.exceptions as auth_exceptions
import requests
from google.api_core import exceptions as api_exceptions
from google.cloud.storage.exceptions import DataCorruption, InvalidResponse

from cmbcluster import errors
from cmbcluster.errors import CmbclusterError, ProviderUnavailable

__all__ = ["GCS", "error_for_status", "gcs_errors", "google_message", "translate_error"]

#: How Cloud Storage is named in error messages.
GCS = "Google Cloud Storage"


def google_message(response: requests.Response) -> str:
    """The ``error.message`` of a Google JSON error body (or the start of a non-JSON one)."""
    try:
        error = response.json().get("error", {})
    except ValueError:
        return response.text[:300]
    if isinstance(error, dict):
        return str(error.get("message", ""))
    return str(error)


def error_for_status(
    status: int,
    what: str,
    *,
    service: str = "Google Cloud",
    detail: object = None,
    response: object = None,
    forbidden: str | None = None,
) -> CmbclusterError:
    """The typed error for an HTTP ``status`` that ``service`` answered about ``what``; a 429's
    ``Retry-After`` comes from ``response``'s headers."""
    headers = getattr(response, "headers", None)
    retry_after = errors.retry_after_seconds(headers.get("Retry-After") if headers is not None else None)
    return errors.error_for_status(
        status, what, service=service, detail=detail, retry_after=retry_after, forbidden=forbidden
    )


def translate_error(exc: BaseException, what: str) -> CmbclusterError | None:
    """The typed CMBCluster error for an error of the Google client stack, or None if not one.

    google-api-core, google-auth, resumable-media and transport (requests/urllib3) errors become
    :mod:`cmbcluster.errors` here. ``what`` names the resource.
    """
    if isinstance(exc, CmbclusterError):
        return exc
    if isinstance(exc, api_exceptions.RetryError):
        return ProviderUnavailable(f"{GCS} did not answer for {what} (gave up after retrying)", detail=str(exc.cause))
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        return error_for_status(exc.code or 500, what, service=GCS, detail=exc.message, response=exc.response)
    if isinstance(exc, InvalidResponse):
        # Resumable-media errors (uploads) carry the HTTP response: classify them by its status.
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            return error_for_status(status, what, service=GCS, detail=str(exc), response=response)
        return ProviderUnavailable(f"{GCS} gave an unexpected answer for {what}", detail=str(exc))
    if isinstance(exc, auth_exceptions.DefaultCredentialsError):
        return ProviderUnavailable("no Google Cloud credentials are configured", detail=str(exc))
    if isinstance(exc, auth_exceptions.GoogleAuthError):  # TransportError, RefreshError, ...
        return ProviderUnavailable("could not authenticate to Google Cloud", detail=str(exc))
    if isinstance(exc, DataCorruption):
        return ProviderUnavailable(f"data of {what} was corrupted in transit; try again", detail=str(exc))
    if isinstance(exc, OSError):
        # requests' ConnectionError/Timeout (RequestException is an OSError), urllib3 and socket errors.
        return ProviderUnavailable(f"cannot reach {GCS} for {what}", detail=str(exc))
    return None


@contextlib.contextmanager
def gcs_errors(what: str) -> Iterator[None]:
    """Translate Google client errors raised inside the block (see :func:`translate_error`)."""
    try:
        yield
    except Exception as exc:
        mapped = translate_error(exc, what)
        if mapped is None or mapped is exc:
            raise
        raise mapped from exc
