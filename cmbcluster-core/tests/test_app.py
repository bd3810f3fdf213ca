"""The app factory, health, readiness, metrics and error answers."""

from __future__ import annotations

import gc
import sqlite3
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import sqlalchemy.exc
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr
from waiting import wait_until_no_connection_is_out

from cmbcluster import hookimpl
from cmbcluster.api.errors import install_error_handlers
from cmbcluster.app import create_app
from cmbcluster.errors import LimitExceeded, NotFound, ProviderUnavailable
from cmbcluster.local.storage import LocalStorage
from cmbcluster.plugins import PluginManager
from cmbcluster.registrations import ProviderContext, StorageBackendRegistration
from cmbcluster.services.environment_entry import TICKET_PARAMETER
from cmbcluster.settings import CoreSettings
from cmbcluster.testing.api import LOCAL, dev_sign_in
from cmbcluster.testing.process import ServeProcess, clean_environ


def test_healthz_and_readyz(client: TestClient) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {
        "database": "ok", "storage:local": "ok", "compute:local": "ok", "infra:local": "ok", "auth:local": "ok",
    }  # fmt: skip


class UnreachableStorage(LocalStorage):
    def check_ready(self) -> None:
        raise ProviderUnavailable("object store at 127.0.0.1:9 refused the connection")


def _plugin_with(factory: object) -> SimpleNamespace:
    @hookimpl
    def cmbcluster_storage_backends() -> Iterator[StorageBackendRegistration]:
        yield StorageBackendRegistration(name="flaky", factory=factory)  # type: ignore[arg-type]

    return SimpleNamespace(cmbcluster_storage_backends=cmbcluster_storage_backends)


def test_readyz_is_503_naming_the_provider_that_is_down(settings: CoreSettings) -> None:
    manager = PluginManager(entry_points_enabled=False)
    manager.register(_plugin_with(lambda ctx: UnreachableStorage(ctx.data_dir / "b")), name="flaky")
    app = create_app(settings.model_copy(update={"storage_backend": "flaky"}), manager)
    with TestClient(app, base_url=LOCAL) as client:
        ready = client.get("/readyz")
    assert ready.status_code == 503
    # which check failed and how, for anyone; the reason (an address here) for the operator's log only
    assert ready.json()["checks"]["storage:flaky"] == "ProviderUnavailable (the server log has the details)"
    assert ready.json()["checks"]["database"] == "ok"


def test_selected_third_party_backend_is_the_one_used(settings: CoreSettings) -> None:
    manager = PluginManager(entry_points_enabled=False)
    made: list[ProviderContext] = []

    def factory(ctx: ProviderContext) -> LocalStorage:
        made.append(ctx)
        return LocalStorage(ctx.data_dir / "flaky-buckets")

    manager.register(_plugin_with(factory), name="flaky")
    app = create_app(settings.model_copy(update={"storage_backend": "flaky"}), manager)
    assert isinstance(app.state.context.storage, LocalStorage)
    assert app.state.context.storage.root == settings.data_dir / "flaky-buckets"
    assert len(made) == 1


def test_metrics_count_requests_by_route_template(client: TestClient, admin: dict[str, str]) -> None:
    client.get("/healthz")
    client.get("/healthz")
    client.get("/no/such/page")
    text = client.get("/metrics", headers=admin).text
    assert 'cmbcluster_http_requests_total{method="GET",route="/healthz",status="200"} 2.0' in text
    assert 'route="unmatched",status="404"' in text
    assert "cmbcluster_http_request_duration_seconds_bucket" in text
    assert 'cmbcluster_info{auth="local",compute="local"' in text


def test_metrics_name_users_so_only_administrators_and_the_scrape_token_read_them(settings: CoreSettings) -> None:
    """/metrics carries every user's e-mail with their usage: an ingress routing / to the server
    must not publish it. Prometheus sends CMBCLUSTER_METRICS_TOKEN; administrators may look."""
    scrape = "s" * 40
    app = create_app(settings.model_copy(update={"metrics_token": SecretStr(scrape)}))
    with TestClient(app, base_url=LOCAL) as client:
        admin = dev_sign_in(client, "admin@example.org")  # the first to sign in
        user = dev_sign_in(client, "carol@example.org")
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer " + "x" * 40}).status_code == 401
        assert client.get("/metrics", headers=user).status_code == 403
        for headers in (admin, {"Authorization": f"Bearer {scrape}"}):
            answer = client.get("/metrics", headers=headers)
            assert answer.status_code == 200 and "cmbcluster_http_requests_total" in answer.text


def test_a_weak_metrics_token_is_refused(settings: CoreSettings) -> None:
    with pytest.raises(ValueError, match="at least 32 random characters"):
        CoreSettings.model_validate({**settings.model_dump(), "metrics_token": "changeme"})


def test_two_apps_do_not_share_state(settings: CoreSettings, tmp_path: object) -> None:
    first = create_app(settings)
    second = create_app(settings.model_copy(update={"data_dir": settings.data_dir / "other"}))
    with TestClient(first, base_url=LOCAL) as a, TestClient(second, base_url=LOCAL) as b:
        a.get("/healthz")
        assert 'route="/healthz"' not in b.get("/metrics", headers=dev_sign_in(b, "admin@example.org")).text


def test_plugins_endpoint_is_for_admins(client: TestClient, admin: dict[str, str], alice: dict[str, str]) -> None:
    assert client.get("/api/v1/plugins").status_code == 401
    assert client.get("/api/v1/plugins", headers=alice).status_code == 403
    body = client.get("/api/v1/plugins", headers=admin).json()
    assert body["active"] == {"storage": "local", "compute": "local", "infra": "local", "auth": "local"}
    assert {p["name"] for p in body["plugins"]} >= {"local", "aws", "gcp"}


def test_openapi_is_served(client: TestClient) -> None:
    spec = client.get("/api/v1/openapi.json").json()
    assert "/api/v1/plugins" in spec["paths"]
    # the development sign-in's form is documented as what it is: a step of the browser flow
    form = spec["paths"]["/api/v1/auth/local/form"]
    assert "text/html" in form["get"]["responses"]["200"]["content"] and "API token" in form["get"]["description"]
    assert "303" in form["post"]["responses"]
    assert not any(path.startswith("/environments/") for path in spec["paths"])  # the environments' own traffic


def test_the_api_documentation_works_offline(client: TestClient) -> None:
    """Swagger UI comes from the package: every script and stylesheet of the page is served here."""
    import re

    page = client.get("/api/docs")
    assert page.status_code == 200 and "/api/v1/openapi.json" in page.text
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert any(a.endswith("swagger-ui-bundle.js") for a in assets) and any(a.endswith(".css") for a in assets)
    for asset in assets:
        assert asset.startswith("/api/docs/assets/"), f"{asset} would need the internet"
        answer = client.get(asset)
        assert answer.status_code == 200 and len(answer.content) > 100, asset
    bundle = client.get(next(a for a in assets if a.endswith("swagger-ui-bundle.js"))).text
    version = re.search(r'PACKAGE_VERSION:"(\d+)\.', bundle)
    assert version is not None and int(version.group(1)) >= 5  # Swagger UI 5 reads OpenAPI 3.1 (FastAPI's)
    assert client.get("/api/docs/assets/nothing.js").status_code == 404


def test_typed_errors_become_clear_statuses_and_unexpected_ones_hide_details(settings: CoreSettings) -> None:
    app = create_app(settings)

    @app.get("/boom/{kind}")
    def boom(kind: str) -> None:
        if kind == "missing":
            raise NotFound("environment abc not found")
        if kind == "busy":
            raise LimitExceeded("too many environments starting", retry_after=7)
        raise RuntimeError("secret internals: password=hunter2")

    with TestClient(app, raise_server_exceptions=False, base_url=LOCAL) as client:
        missing = client.get("/boom/missing")
        assert missing.status_code == 404
        assert missing.json() == {"error": "not_found", "message": "environment abc not found"}
        busy = client.get("/boom/busy")
        assert busy.status_code == 429 and busy.headers["retry-after"] == "7"
        crash = client.get("/boom/crash")
        assert crash.status_code == 500
        assert "hunter2" not in crash.text and "Traceback" not in crash.text


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (sqlalchemy.exc.TimeoutError("QueuePool limit of size 40 overflow 10 reached"), 503),
        (sqlalchemy.exc.OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked")), 503),
        (sqlalchemy.exc.OperationalError("SELECT", {}, sqlite3.OperationalError("no such table: x")), 500),
    ],
)
def test_an_overloaded_database_answers_503_with_retry_after(error: Exception, status: int) -> None:
    """Every connection busy or SQLite's lock wait used up is overload: 503, retry later, never a traceback."""
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    def boom() -> None:
        raise error

    response = TestClient(app, raise_server_exceptions=False, base_url=LOCAL).get("/boom")
    assert response.status_code == status
    assert "Traceback" not in response.text
    if status == 503:
        assert response.headers["Retry-After"] == "2"
        assert response.json()["error"] == "busy"


def test_every_request_gives_its_database_connection_back(
    app: FastAPI, client: TestClient, alice: dict[str, str]
) -> None:
    """Whatever a request ends with (an answer, a refusal raised after a query, invalid input, a
    route run in a worker thread), its database session is closed: no connection stays checked out
    of the pool, where a few hundred requests would exhaust it."""
    pool = app.state.context.engine.pool
    created = client.post("/api/v1/environments", headers=alice, json={"application": "files", "start": False})
    assert created.status_code == 201, created.text
    for method, path, body, status in [
        ("GET", "/api/v1/environments", None, 200),  # on the event loop
        ("GET", f"/api/v1/environments/{created.json()['id']}", None, 200),
        ("GET", "/api/v1/environments/nope", None, 404),  # refused after its query
        ("GET", "/api/v1/storages", None, 200),  # a route run in a worker thread
        ("POST", "/api/v1/storages", {"display_name": ""}, 422),
        ("PATCH", "/api/v1/environments/nope", {"name": "x"}, 404),
    ]:
        answer = client.request(method, path, headers=alice, json=body)
        assert answer.status_code == status, (path, answer.text)
        assert wait_until_no_connection_is_out(pool) == 0, (method, path)


def test_the_log_has_no_line_per_proxied_request_unless_debugging(capsys: pytest.CaptureFixture[str]) -> None:
    """Found by a newcomer: 99 of 171 lines of a few minutes' log were httpx's, one per request the
    environment proxy passed on to JupyterLab. At INFO they are not written; at DEBUG they are."""
    import logging

    from cmbcluster.observability import configure_logging

    root = logging.getLogger()
    names = ("httpx", "httpcore", "uvicorn", "uvicorn.access")
    kept = root.handlers[:], root.level, {n: logging.getLogger(n).level for n in names}
    try:
        configure_logging("INFO")
        logging.getLogger("httpx").info('HTTP Request: GET http://127.0.0.1/lab "HTTP/1.1 200 OK"')
        logging.getLogger("cmbcluster").info("environment started")
        configure_logging("DEBUG")
        logging.getLogger("httpx").debug("HTTP Request: while debugging")
        # httpcore's trace holds every header, an application's cookies among them (an outsider's trial)
        logging.getLogger("httpcore.http11").debug("receive_response_headers.complete Set-Cookie: _xsrf=Secret")
        err = capsys.readouterr().err
        assert "environment started" in err and "/lab" not in err and "while debugging" in err
        assert "_xsrf" not in err
        # uvicorn logs a WebSocket's address as it accepts it: JupyterLab's hold its token (an outsider's trial)
        for name in ("token", "tok%65n"):
            logging.getLogger("uvicorn.error").info(
                '%s - "WebSocket %s" [accepted]', "127.0.0.1:5", f"/environments/x/channels?s=1&{name}=Sesame&k=2"
            )
            assert f"/environments/x/channels?s=1&{name}=[token]&k=2" in capsys.readouterr().err
        # no line per request unless the access log is asked for (CMBCLUSTER_ACCESS_LOG)
        configure_logging("INFO")
        logging.getLogger("uvicorn.access").info(
            '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "GET", "/healthz", "1.1", 200
        )
        assert "/healthz" not in capsys.readouterr().err
    finally:  # this process's logging as it was (pytest's own capture)
        root.handlers[:], levels = kept[0], kept[2]
        root.setLevel(kept[1])
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def test_the_access_log_writes_a_line_per_request_with_one_time_secrets_hidden(tmp_path: Path) -> None:
    """CMBCLUSTER_ACCESS_LOG=true, for an operator with nothing in front that logs requests: the
    server's own log gets each request's method, path and status, and never a sign-in callback's
    one-time code, a host's sign-in ticket or an application's token, spelled any way."""
    env = clean_environ({"CMBCLUSTER_DATA_DIR": str(tmp_path / "data"), "CMBCLUSTER_ACCESS_LOG": "true",
                         "CMBCLUSTER_LOG_FORMAT": "text"})  # fmt: skip
    with ServeProcess(env, tmp_path) as server:
        server.wait_ready("/readyz")
        with httpx.Client(base_url=server.url) as http:
            assert http.get("/healthz").status_code == 200
            http.get("/api/v1/auth/callback", params={"code": "Secret-Code-1", "state": "s"})
            http.get("/environments/x/lab?tok%65n=Secret-Token-3&Ticket=Secret-Ticket-4")
            http.get(f"/environments/x/lab?{TICKET_PARAMETER}=Secret-Ticket-5&access_token=Secret-Token-6")
            http.get("/environments/x/lab?token=Secret-8%26Secret-9&k=1")  # an & inside the value is the value's
            # an address inside another (enter's next, where the ingress puts the one asked for)
            http.get("/api/v1/environments/x/enter?next=https%3A%2F%2Fe.example%2Flab%3Ftoken%3DSecret-7%26k%3D2")
            # ... partly encoded, as a script or a browser may leave it (an outsider's trial)
            http.get("/environments/x/lab?next=/x?a=1%26token=Secret-10")
            http.get("/environments/x/lab?next=/x%3Fa=1%26token=Secret-11&k=3")
            http.get("/environments/x/lab?next=http://x/?a=1%26token=Secret-12%26k=4")
        deadline = time.monotonic() + 10
        while "/enter?" not in server.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        log = server.output()
    assert '"GET /healthz HTTP/1.1" 200' in log
    assert "/api/v1/auth/callback?code=[code]&state=s" in log
    assert "tok%65n=[token]" in log and "Ticket=[ticket]" in log
    assert f"{TICKET_PARAMETER}=[ticket]&access_token=[token]" in log
    assert "next=https%3A%2F%2Fe.example%2Flab%3Ftoken%3D[token]%26k%3D2" in log
    assert "?token=[token]&k=1" in log
    assert "next=/x?a=1%26token=[token]" in log and "next=/x%3Fa=1%26token=[token]&k=3" in log
    assert "next=http://x/?a=1%26token=[token]%26k=4" in log
    assert "Secret-" not in log


def test_every_api_route_ends_its_database_transaction_in_its_worker(app: FastAPI) -> None:
    """A sync route runs in a worker thread and its answer is validated in another; a route of a
    router made without SessionReleasingRoute would keep its connection across both hops (200
    users at once then stopped the server: tests/test_many_users_at_once.py)."""
    from fastapi.routing import APIRoute, iter_route_contexts

    from cmbcluster.api.deps import SessionReleasingRoute

    routes = [context.original_route for context in iter_route_contexts(app.routes)]
    api_routes = [route for route in routes if isinstance(route, APIRoute)]
    assert len(api_routes) > 50
    assert [route.path for route in api_routes if not isinstance(route, SessionReleasingRoute)] == []


def test_a_request_is_matched_only_against_the_routers_whose_prefix_its_path_has(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FastAPI matches an included router's routes one by one, and the routers in the order they
    were included: every request for an environment's own traffic (the proxy, after every API
    router) and every page of the web UI was first matched against all 80 API routes, about 140 us
    of a proxied request's time. A router now passes at once on a path without its prefix."""
    from fastapi.routing import APIRoute

    asked: list[str] = []
    matches = APIRoute.matches

    def counted(route: APIRoute, scope: dict[str, object]) -> object:
        asked.append(route.path)
        return matches(route, scope)

    monkeypatch.setattr(APIRoute, "matches", counted)
    for path in ("/environments/0123456789abcdef0123456789abcdef/lab", "/healthz", "/"):
        asked.clear()
        answer = client.get(path, follow_redirects=False)
        assert answer.status_code < 500, (path, answer.text)
        assert [route for route in asked if route.startswith("/api/v1/")] == [], path
    asked.clear()
    assert client.get("/api/v1/usage/me").status_code == 401  # a route of a later router is still found
    assert "/api/v1/usage/me" in asked and not [r for r in asked if r.startswith("/api/v1/environments")]


def test_every_refusal_has_a_code_of_its_own() -> None:
    """Found by an outsider's trial: a start refused by a budget answered 403 with the error code
    "internal_error", which a client reads as a server fault. Every error that answers a 4xx names
    what it is."""
    import importlib
    import pkgutil

    import cmbcluster
    from cmbcluster.errors import CmbclusterError

    for module in pkgutil.walk_packages(cmbcluster.__path__, "cmbcluster."):
        if ".plugin_template" not in module.name and ".migrations" not in module.name:
            try:
                importlib.import_module(module.name)
            except ModuleNotFoundError:  # an example of an optional program (streamlit)
                continue
    errors, found = [CmbclusterError], []
    while errors:
        error = errors.pop()
        errors.extend(error.__subclasses__())
        found.append(error)
    assert len(found) > 15  # the modules were read
    internal = [e.__qualname__ for e in found if e.http_status < 500 and e.code == "internal_error"]
    assert internal == []


def test_an_app_no_longer_used_is_freed(settings: CoreSettings) -> None:
    """A process that makes apps (a plugin's contract suite, a test run: hundreds) does not keep
    every one it made: FastAPI caches endpoints by identity in a module-level cache, and an endpoint
    that held its app kept it there."""
    app = create_app(settings)
    with TestClient(app, base_url=LOCAL) as client:
        assert client.get("/api/docs").status_code == 200
        dev_sign_in(client, "ada@example.org")
    made = weakref.ref(app)
    del app, client
    gc.collect()
    assert made() is None
