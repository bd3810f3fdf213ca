"""The plugin's one client for Google's JSON REST APIs: retries, long-running operations, typed errors.

Used by the infrastructure provisioner (Compute, Container, Artifact Registry, Cloud DNS) and the
Workload Identity provider (IAM, Resource Manager). Every Google answer becomes the same typed core
error, whichever module asked (:mod:`cmbcluster_gcp.errors`).
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

import google.auth.credentials
import google.auth.exceptions
import google.auth.transport.requests
import requests

from cmbcluster.errors import CmbclusterError, InvalidRequest, NotFound, ProviderUnavailable
from cmbcluster_gcp.errors import error_for_status, google_message

log = logging.getLogger(__name__)
T = TypeVar("T")

#: answers worth another try: every call made through :class:`GoogleApi` is safe to repeat
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
#: How long a call naming an IAM principal made moments ago is retried. Google documents IAM
#: changes as "usually within 60 seconds" and sometimes up to 7 minutes; a new service account is
#: refused as a member (400 "... does not exist") until it has propagated.
IAM_PROPAGATION_SECONDS = 120.0


def not_propagated(error: CmbclusterError) -> bool:
    """Google's answer to a policy naming a principal (a service account, a Workload Identity pool)
    that IAM does not know everywhere yet: 400 or 404 saying it "does not exist"."""
    text = f"{error.message} {error.detail or ''}".lower()
    return isinstance(error, (InvalidRequest, NotFound)) and "does not exist" in text


def until_propagated(
    call: Callable[[], T],
    *,
    what: str,
    window: float = IAM_PROPAGATION_SECONDS,
    pending: Callable[[CmbclusterError], bool] = not_propagated,
    first_delay: float = 1.0,
    max_delay: float = 10.0,
) -> T:
    """``call()``; while it fails because IAM has not propagated a new principal yet (``pending``),
    again after a growing delay, for ``window`` seconds in all. Any other error is raised as it is;
    the same one once the window is over becomes ProviderUnavailable saying so (a rerun may pass)."""
    waited, delay = 0.0, first_delay
    while True:
        try:
            return call()
        except CmbclusterError as exc:
            if not pending(exc):
                raise
            if waited >= window:
                reason = f"{exc.message}: {exc.detail}" if exc.detail else exc.message
                raise ProviderUnavailable(
                    f"{what}: Google Cloud IAM still does not know a principal made moments ago after {window:.0f} s "
                    f"({reason}); try again in a few minutes"
                ) from exc
            pause = min(delay, max_delay, window - waited)
            log.info(
                "%s: IAM has not propagated a new principal yet (%s); retrying in %.1f s", what, exc.message, pause
            )
            time.sleep(pause)
            waited += max(pause, 1e-3)
            delay *= 2


class GoogleApi:
    """A small JSON client for Google's REST APIs: retries, long-running operations, typed errors.

    ``endpoint`` replaces ``https://<service>.googleapis.com`` for every service (tests);
    429, 5xx and connection failures are retried with backoff (every call here is safe to
    repeat: a repeated create answers 409, which callers treat as "exists").
    """

    def __init__(
        self,
        credentials: google.auth.credentials.Credentials,
        *,
        endpoint: str | None = None,
        attempts: int = 4,
        backoff_seconds: float = 1.0,
        timeout: float | tuple[float, float] = 60.0,
        poll_interval: float = 10.0,
        service_name: str = "Google Cloud",
        forbidden_hint: str | None = None,
        storage_endpoint: str | None = None,
    ) -> None:
        self.endpoint = endpoint.rstrip("/") if endpoint else None
        #: Cloud Storage's own base URL (a GCS emulator: STORAGE_EMULATOR_HOST), where it differs
        self.storage_endpoint = storage_endpoint.rstrip("/") if storage_endpoint else None
        self.service_name = service_name  # in error messages: "Google Cloud IAM refused ..."
        self.forbidden_hint = forbidden_hint  # what a 403 tells the operator to grant
        self.attempts = attempts
        self.backoff_seconds = backoff_seconds
        self.timeout = timeout
        self.poll_interval = poll_interval
        session_type: Any = google.auth.transport.requests.AuthorizedSession  # google-auth is untyped
        self.session: Any = session_type(credentials)

    def url(self, service: str, path: str) -> str:
        base = self.endpoint or f"https://{service}.googleapis.com"
        if service == "storage" and self.storage_endpoint:
            base = self.storage_endpoint
        return f"{base}/{path.lstrip('/')}"

    def request(
        self,
        method: str,
        service: str,
        path: str,
        what: str,
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        return self.request_url(method, self.url(service, path), what, body=body, params=params)

    def request_url(
        self, method: str, url: str, what: str, *, body: Any = None, params: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """One call to ``url``, as JSON; retried on 429, 5xx and connection failures."""
        delay = self.backoff_seconds
        failure: CmbclusterError | None = None
        for attempt in range(self.attempts):
            try:
                response = self.session.request(method, url, json=body, params=params, timeout=self.timeout)
            except google.auth.exceptions.RefreshError as exc:
                raise ProviderUnavailable(f"could not authenticate to Google Cloud: {exc}") from None
            except (requests.RequestException, google.auth.exceptions.TransportError) as exc:
                failure = ProviderUnavailable(f"cannot reach {self.service_name} for {what}", detail=str(exc))
            else:
                if response.status_code < 300:
                    data = response.json() if response.content else {}
                    return data if isinstance(data, dict) else {}
                failure = error_for_status(
                    response.status_code, what, service=self.service_name, detail=google_message(response) or None,
                    response=response, forbidden=self.forbidden_hint,
                )  # fmt: skip
                if response.status_code not in RETRYABLE_STATUS:
                    raise failure
            if attempt + 1 < self.attempts:
                log.warning(
                    "%s call for %s failed (%s); retrying in %.1fs", self.service_name, what, failure.message, delay
                )
                time.sleep(delay)
                delay *= 2
        assert failure is not None
        raise failure

    def get(self, service: str, path: str, what: str) -> dict[str, Any] | None:
        """The resource, or None when it does not exist."""
        try:
            return self.request("GET", service, path, what)
        except NotFound:
            return None

    def wait(self, service: str, operation: dict[str, Any], what: str, *, timeout: float = 2400) -> None:
        """Poll a long-running operation until done; its failure becomes ProviderUnavailable.

        Compute and container operations report ``status: DONE`` and are read at their
        ``selfLink`` path; Artifact Registry's are ``{name, done}`` read at ``v1/<name>``.
        """
        deadline = time.monotonic() + timeout
        delay = min(0.5, self.poll_interval)  # many operations end within seconds: poll soon, then back off
        while True:
            error = operation.get("error")
            if operation.get("status") == "DONE" or operation.get("done") is True:
                if error:
                    errors = error.get("errors") if isinstance(error, dict) else None
                    detail = (
                        errors[0].get("message")
                        if errors
                        else (error.get("message") if isinstance(error, dict) else error)
                    )
                    raise ProviderUnavailable(f"{what} failed: {detail}")
                return
            if time.monotonic() > deadline:
                raise ProviderUnavailable(f"{what} did not finish within {timeout:.0f} s; rerun `up` to resume")
            time.sleep(delay)
            delay = min(delay * 2, self.poll_interval)
            operation = self.request("GET", service, self._operation_path(service, operation), what)

    @staticmethod
    def _operation_path(service: str, operation: dict[str, Any]) -> str:
        self_link = str(operation.get("selfLink") or "")
        if self_link:
            path = urllib.parse.urlsplit(self_link).path
            if service == "container":  # container's selfLink is .../v1/projects/<p>/locations/<l>/operations/<id>
                return path[path.index("/v1/") :] if "/v1/" in path else path
            return path
        return f"v1/{operation['name']}"

    def close(self) -> None:
        self.session.close()
