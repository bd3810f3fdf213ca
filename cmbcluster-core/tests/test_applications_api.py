"""The application catalog (API and seeding) and the resource presets."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from cmbcluster.compute.command import LaunchValues, render_command
from cmbcluster.db import create_db_engine, session_factory, upgrade
from cmbcluster.db.models import Application, AuditEvent, Environment
from cmbcluster.errors import InvalidRequest
from cmbcluster.services import catalog
from cmbcluster.services.catalog import resolve_resources, seed_catalog

API = "/api/v1/applications"

IMAGE = "registry.example.org/cmbcluster/environment:1.0"


def new_app(**extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "slug": "streamlit-demo",
        "name": "Streamlit demo",
        "summary": "A demo app",
        "image": "ghcr.io/example/streamlit:1.0",
        "command": ["streamlit", "run", "app.py", "--server.port={port}", "--server.address={host}"],
        "port": 8501,
        "category": "Apps",
        "tags": ["demo", "streamlit"],
        "default_preset": "light",
    }
    body.update(extra)
    return body


def sessions_of(client: TestClient) -> sessionmaker[Session]:
    maker: sessionmaker[Session] = client.app.state.context.sessions  # type: ignore[attr-defined]
    return maker


def audit_actions(client: TestClient, target_id: str) -> list[str]:
    with sessions_of(client)() as db:
        rows = db.execute(select(AuditEvent).where(AuditEvent.target_id == target_id).order_by(AuditEvent.id))
        return [event.action for event in rows.scalars()]


# -- presets ---------------------------------------------------------------------------------------
def test_presets_and_custom_limits(client: TestClient, alice: dict[str, str]) -> None:
    assert client.get(f"{API}/presets").status_code == 401
    body = client.get(f"{API}/presets", headers=alice).json()
    assert [(p["name"], p["cpu"], p["memory_mib"], p["available"]) for p in body["presets"]] == [
        ("light", 0.5, 1024, True),
        ("standard", 1.0, 2048, True),
        ("heavy", 2.0, 8192, True),
    ]
    assert all(p["description"] for p in body["presets"])
    assert body["custom"] == {"max_cpu": 8.0, "max_memory_mib": 32768, "min_memory_mib": 128, "cpu_step": 0.1}


def test_presets_follow_the_server_limits(settings: Any) -> None:
    from cmbcluster.app import create_app
    from cmbcluster.testing.api import LOCAL, dev_sign_in

    app = create_app(settings.model_copy(update={"max_cpu": 1.5, "max_memory_mib": 4096}))
    with TestClient(app, base_url=LOCAL) as client:
        headers = dev_sign_in(client, "ada@example.org")
        body = client.get(f"{API}/presets", headers=headers).json()
    assert {p["name"]: p["available"] for p in body["presets"]} == {"light": True, "standard": True, "heavy": False}
    assert body["custom"]["max_cpu"] == 1.5 and body["custom"]["max_memory_mib"] == 4096


LIMITS = {"max_cpu": 4.0, "max_memory_mib": 16384}


@pytest.mark.parametrize(
    ("preset", "cpu", "memory", "expected"),
    [
        ("light", None, None, ("light", 0.5, 1024)),
        ("standard", None, None, ("standard", 1.0, 2048)),
        ("heavy", None, None, ("heavy", 2.0, 8192)),
        (None, None, None, ("standard", 1.0, 2048)),  # nothing asked: the default preset
        ("heavy", 2.0, 8192, ("heavy", 2.0, 8192)),  # consistent repetition is fine
        ("heavy", 2, None, ("heavy", 2.0, 8192)),
        (None, 1.5, 3000, ("custom", 1.5, 3000)),
        ("custom", 0.1, 128, ("custom", 0.1, 128)),  # the smallest possible
        ("custom", 4, 16384, ("custom", 4.0, 16384)),  # exactly the limits
        (None, 0.3, 512, ("custom", 0.3, 512)),  # 0.3 is not exact in binary, still a multiple of 0.1
        (None, 2.7000000000000001, 512, ("custom", 2.7, 512)),
    ],
)
def test_resolve_resources(
    preset: str | None, cpu: float | None, memory: int | None, expected: tuple[str, float, int]
) -> None:
    assert resolve_resources(preset, cpu, memory, **LIMITS) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("preset", "cpu", "memory", "message"),
    [
        ("huge", None, None, "unknown resource preset 'huge'"),
        ("Standard", None, None, "unknown resource preset"),
        ("", None, None, "unknown resource preset"),
        ("standard", 2.0, None, "the 'standard' preset means 1 CPU and 2048 MiB"),
        ("light", None, 4096, "choose the 'custom' preset"),
        ("custom", None, None, "needs both cpu and memory_mib"),
        (None, 1.0, None, "need both cpu and memory_mib"),
        (None, None, 1024, "need both cpu and memory_mib"),
        ("custom", 0, 1024, "positive"),
        ("custom", -1, 1024, "positive"),
        ("custom", float("nan"), 1024, "positive"),
        ("custom", float("inf"), 1024, "positive"),
        ("custom", 0.25, 1024, "multiple of 0.1"),
        ("custom", 0.05, 1024, "multiple of 0.1"),
        ("custom", 4.1, 1024, "too many"),
        ("custom", 1, 127, "at least 128 MiB"),
        ("custom", 1, 0, "at least 128 MiB"),
        ("custom", 1, -5, "at least 128 MiB"),
        ("custom", 1, 16385, "too much memory"),
        ("custom", True, 1024, "number of cores"),
        ("custom", "1", 1024, "number of cores"),
        ("custom", 1, 1024.5, "whole number"),
    ],
)
def test_resolve_resources_refuses_impossible_requests(preset: Any, cpu: Any, memory: Any, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(")):
        resolve_resources(preset, cpu, memory, **LIMITS)  # type: ignore[arg-type]


def test_presets_over_the_server_limits_are_refused() -> None:
    with pytest.raises(InvalidRequest, match="'heavy' preset is too large"):
        resolve_resources("heavy", None, None, max_cpu=1.0, max_memory_mib=32768)
    with pytest.raises(InvalidRequest, match="'standard' preset is too large"):
        resolve_resources(None, None, None, max_cpu=8, max_memory_mib=1024)


# -- catalog CRUD ----------------------------------------------------------------------------------
def test_catalog_crud_and_audit(client: TestClient, admin: dict[str, str], alice: dict[str, str]) -> None:
    created = client.post(API, json=new_app(), headers=admin)
    assert created.status_code == 201, created.text
    app = created.json()
    assert app["slug"] == "streamlit-demo" and app["port"] == 8501 and app["active"] is True
    assert app["working_dir"] == "" and app["icon"] == "" and len(app["id"]) == 32

    # everyone signed in reads it, by id or slug
    assert client.get(API).status_code == 401
    listed = client.get(API, headers=alice).json()["items"]
    assert "streamlit-demo" in [a["slug"] for a in listed]
    assert client.get(f"{API}/streamlit-demo", headers=alice).json()["id"] == app["id"]
    assert client.get(f"{API}/{app['id']}", headers=alice).json()["slug"] == "streamlit-demo"
    assert client.get(f"{API}/nothing-here", headers=alice).status_code == 404

    # a partial change keeps everything else
    patched = client.patch(f"{API}/{app['id']}", json={"name": "Streamlit", "tags": ["x", "x", "y"]}, headers=admin)
    assert patched.status_code == 200, patched.text
    body = patched.json()
    assert (body["name"], body["tags"], body["image"], body["port"]) == (
        "Streamlit",
        ["x", "y"],
        "ghcr.io/example/streamlit:1.0",
        8501,
    )
    assert client.patch(f"{API}/streamlit-demo", json={}, headers=admin).json()["name"] == "Streamlit"  # no-op

    # renaming the slug: the old one is gone, the id stays
    renamed = client.patch(f"{API}/streamlit-demo", json={"slug": "streamlit-maps"}, headers=admin).json()
    assert renamed["id"] == app["id"]
    assert client.get(f"{API}/streamlit-demo", headers=alice).status_code == 404

    deleted = client.delete(f"{API}/streamlit-maps", headers=admin)
    assert deleted.status_code == 204
    assert client.get(f"{API}/{app['id']}", headers=admin).status_code == 404
    assert client.delete(f"{API}/{app['id']}", headers=admin).status_code == 404

    assert audit_actions(client, app["id"]) == [
        "application.created",
        "application.updated",
        "application.updated",
        "application.deleted",
    ]
    with sessions_of(client)() as db:
        update = (
            db.execute(
                select(AuditEvent).where(AuditEvent.target_id == app["id"], AuditEvent.action == "application.updated")
            )
            .scalars()
            .first()
        )
        assert update is not None
        assert update.detail["before"] == {"name": "Streamlit demo", "tags": ["demo", "streamlit"]}
        assert update.detail["after"] == {"name": "Streamlit", "tags": ["x", "y"]}
        assert update.actor_id is not None


def test_inactive_applications_are_for_admins_only(
    client: TestClient, admin: dict[str, str], alice: dict[str, str]
) -> None:
    app = client.post(API, json=new_app(slug="retired", active=False), headers=admin).json()
    client.post(API, json=new_app(slug="current"), headers=admin)
    user_view = [a["slug"] for a in client.get(API, headers=alice).json()["items"]]
    assert "current" in user_view and "retired" not in user_view
    # a user asking for inactive ones simply sees the active ones
    asked = client.get(API, params={"include_inactive": True}, headers=alice).json()["items"]
    assert "retired" not in [a["slug"] for a in asked]
    assert "retired" not in [a["slug"] for a in client.get(API, headers=admin).json()["items"]]
    admin_view = client.get(API, params={"include_inactive": True}, headers=admin).json()["items"]
    assert {"current", "retired"} <= {a["slug"] for a in admin_view}
    assert client.get(f"{API}/retired", headers=alice).status_code == 404
    assert client.get(f"{API}/{app['id']}", headers=admin).json()["active"] is False
    client.patch(f"{API}/retired", json={"active": True}, headers=admin)
    assert client.get(f"{API}/retired", headers=alice).status_code == 200


def test_catalog_writes_are_for_admins(client: TestClient, admin: dict[str, str], alice: dict[str, str]) -> None:
    app = client.post(API, json=new_app(), headers=admin).json()
    for response in (
        client.post(API, json=new_app(slug="mine"), headers=alice),
        client.post(API, json={"slug": "NOT valid"}, headers=alice),  # refused before the body is judged
        client.patch(f"{API}/{app['id']}", json={"name": "x"}, headers=alice),
        client.delete(f"{API}/{app['id']}", headers=alice),
    ):
        assert response.status_code == 403, response.text
        assert response.json()["error"] == "permission_denied"
    assert client.post(API, json=new_app(slug="anon")).status_code == 401
    assert client.get(f"{API}/{app['id']}", headers=alice).json()["name"] == "Streamlit demo"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"slug": "Upper"}, "slug"),
        ({"slug": "-leading"}, "slug"),
        ({"slug": "trailing-"}, "slug"),
        ({"slug": "has_underscore"}, "slug"),
        ({"slug": "a" * 64}, "slug"),
        ({"slug": ""}, "slug"),
        ({"slug": "presets"}, "slug"),
        ({"slug": "0123456789abcdef0123456789abcdef"}, "slug"),
        ({"name": "   "}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"image": ""}, "image"),
        ({"image": "   "}, "image"),
        ({"image": "x" * 401}, "image"),
        ({"image": "ubuntu latest"}, "image"),
        ({"port": 0}, "port"),
        ({"port": 65536}, "port"),
        ({"port": -1}, "port"),
        ({"port": "many"}, "port"),
        ({"command": [""]}, "command"),
        ({"command": ["ok", ""]}, "command"),
        ({"command": ["ok", 3]}, "command"),
        ({"command": "python -m http.server"}, "command"),
        ({"command": ["x"] * 65}, "command"),
        ({"tags": ["t"] * 21}, "tags"),
        ({"tags": ["x" * 41]}, "tags"),
        ({"tags": [""]}, "tags"),
        ({"default_preset": "huge"}, "default_preset"),
        ({"default_preset": "custom"}, "default_preset"),
        ({"icon": "javascript:alert(1)"}, "icon"),
        ({"icon": "data:text/html,<script>alert(1)</script>"}, "icon"),
        ({"icon": "data:image/png;base64," + "A" * (64 * 1024)}, "icon"),
        ({"icon": "//evil.example/icon.png"}, "icon"),
        ({"icon": "https://example.org/" + "a" * 2100}, "icon"),
        ({"working_dir": "relative/dir"}, "working_dir"),
        ({"category": "c" * 61}, "category"),
        ({"unknown_field": 1}, "unknown_field"),
    ],
)
def test_invalid_applications_are_refused(
    client: TestClient, admin: dict[str, str], change: dict[str, Any], field: str
) -> None:
    created = client.post(API, json=new_app(**change), headers=admin)
    assert created.status_code == 422, created.text
    assert any(field in error["loc"] for error in created.json()["detail"]), created.json()
    existing = client.post(API, json=new_app(slug="valid-one"), headers=admin).json()
    patched = client.patch(f"{API}/{existing['id']}", json=change, headers=admin)
    assert patched.status_code == 422, patched.text
    assert client.get(f"{API}/{existing['id']}", headers=admin).json() == existing  # nothing changed


def test_valid_edge_values_are_accepted(client: TestClient, admin: dict[str, str]) -> None:
    icon = "data:image/svg+xml;base64," + "A" * (60 * 1024)
    body = new_app(
        slug="a", port=65535, command=["x"] * 64, tags=[f"t{i}" for i in range(20)], icon=icon,
        working_dir="/home/user/work", default_preset="heavy", image="x" * 400,
    )  # fmt: skip
    created = client.post(API, json=body, headers=admin)
    assert created.status_code == 201, created.text
    assert created.json()["icon"] == icon
    for icon in ("https://example.org/icon.png", "/static/icons/app.svg", ""):
        assert client.patch(f"{API}/a", json={"icon": icon}, headers=admin).status_code == 200
    assert client.post(API, json=new_app(slug="b" * 63), headers=admin).status_code == 201


def test_nulls_and_duplicates(client: TestClient, admin: dict[str, str]) -> None:
    first = client.post(API, json=new_app(slug="one"), headers=admin).json()
    client.post(API, json=new_app(slug="two"), headers=admin)
    duplicate = client.post(API, json=new_app(slug="one"), headers=admin)
    assert duplicate.status_code == 409 and "exists already" in duplicate.json()["message"]
    clash = client.patch(f"{API}/{first['id']}", json={"slug": "two"}, headers=admin)
    assert clash.status_code == 409
    null = client.patch(f"{API}/one", json={"image": None}, headers=admin)
    assert null.status_code == 422 and "cannot be null: image" in null.text
    missing = client.post(API, json={"slug": "x", "name": "x"}, headers=admin)
    assert missing.status_code == 422 and "image" in missing.text
    assert client.patch(f"{API}/nothing", json={"name": "x"}, headers=admin).status_code == 404


def test_deleting_an_application_in_use_is_refused(
    client: TestClient, admin: dict[str, str], alice: dict[str, str]
) -> None:
    app = client.post(API, json=new_app(), headers=admin).json()
    alice_id = client.get("/api/v1/auth/me", headers=alice).json()["id"]
    with sessions_of(client)() as db:
        db.add(Environment(user_id=alice_id, application_id=app["id"], name="demo", backend="local", status="stopped"))
        db.commit()
    refused = client.delete(f"{API}/{app['id']}", headers=admin)
    assert refused.status_code == 409, refused.text
    body = refused.json()
    assert body["error"] == "conflict" and "deactivate it instead" in body["message"]
    assert body["detail"] == {"environments": 1}
    # the suggested way out works, and the environment keeps its application
    deactivated = client.patch(f"{API}/{app['id']}", json={"active": False}, headers=admin)
    assert deactivated.json()["active"] is False
    assert client.get(f"{API}/{app['id']}", headers=admin).status_code == 200
    assert audit_actions(client, app["id"]) == ["application.created", "application.updated"]


# -- the embedded catalog --------------------------------------------------------------------------
@pytest.fixture
def fresh_db(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'seed.db'}")
    upgrade(engine)
    yield session_factory(engine)
    engine.dispose()


def test_seed_catalog_is_idempotent(fresh_db: sessionmaker[Session]) -> None:
    with fresh_db() as db:
        seed_catalog(db, "local", IMAGE)
        seed_catalog(db, "local", IMAGE)
    with fresh_db() as db:
        seed_catalog(db, "local", IMAGE)
        apps = {app.slug: app for app in db.execute(select(Application)).scalars()}
        assert set(apps) == {"files", "jupyterlab", "streamlit"}
        files, jupyter, streamlit = apps["files"], apps["jupyterlab"], apps["streamlit"]
        assert files.active and files.port == 8080 and files.image == IMAGE  # the project's own image
        # on a Unix socket only the server's user opens, not a loopback port every user can reach
        assert files.command[1:] == ["-m", "cmbcluster.examples.files", "{socket}"]
        assert Path(files.command[0]).exists()  # this very interpreter
        assert files.default_preset in catalog.PRESETS
        # every entry is active: a missing program is shown with its fix, not hidden
        assert jupyter.active and streamlit.active
        assert jupyter.image == IMAGE and jupyter.port == 8888
        assert jupyter.command == [
            "jupyter-lab", "--no-browser", "--ip={host}", "--port={port}", "--ServerApp.port_retries=0",
            "--ServerApp.base_url={base_url}", "--ServerApp.allow_remote_access=True",
        ]  # fmt: skip
        assert not any("token" in part for part in jupyter.command)  # by variable, never on the command line
        assert streamlit.command[:3] == ["streamlit", "run", str(catalog.STREAMLIT_EXAMPLE)]
        assert catalog.STREAMLIT_EXAMPLE.is_file() and "--server.baseUrlPath={base_url}" in streamlit.command
        created = db.execute(
            select(func.count()).select_from(AuditEvent).where(AuditEvent.action == "application.created")
        ).scalar_one()
        assert created == 3


def test_an_earlier_default_is_brought_up_to_date_unless_an_admin_changed_it(fresh_db: sessionmaker[Session]) -> None:
    old = list(catalog.EARLIER_JUPYTER_COMMAND)
    with fresh_db() as db:
        db.add(Application(slug="jupyterlab", name="JupyterLab", image="x", command=old, active=False))
        old_files = ["/usr/bin/python3", "-m", "http.server", "{port}", "--bind", "{host}"]
        db.add(Application(slug="files", name="Files", image="x", command=old_files))
        db.add(Application(slug="mine", name="Mine", image="x", command=["python", "-m", "http.server"]))
        db.commit()
        seed_catalog(db, "local", IMAGE)
        jupyter = db.execute(select(Application).where(Application.slug == "jupyterlab")).scalar_one()
        assert jupyter.command == list(catalog.JUPYTER_COMMAND)
        assert jupyter.active  # seeded inactive because jupyter-lab was missing then
        files = db.execute(select(Application).where(Application.slug == "files")).scalar_one()
        assert files.command[1:] == ["-m", "cmbcluster.examples.files", "{socket}"]
        mine = db.execute(select(Application).where(Application.slug == "mine")).scalar_one()
        assert mine.command == ["python", "-m", "http.server"]  # not an earlier default: the admin's
        assert [e.action for e in db.execute(select(AuditEvent)).scalars()] == ["application.updated"] * 2
        seed_catalog(db, "local", IMAGE)  # once
        assert db.execute(select(func.count()).select_from(AuditEvent)).scalar_one() == 2
    with fresh_db() as db:  # deactivated by an admin later: the command is updated, the choice kept
        jupyter = db.execute(select(Application).where(Application.slug == "jupyterlab")).scalar_one()
        jupyter.command, jupyter.active = old, False
        jupyter.created_at -= dt.timedelta(days=1)  # seeded long before
        db.commit()
        seed_catalog(db, "local", IMAGE)
        db.refresh(jupyter)
        assert jupyter.command == list(catalog.JUPYTER_COMMAND) and jupyter.active is False
    with fresh_db() as db:  # on Kubernetes too: the old command served every environment at /
        jupyter = db.execute(select(Application).where(Application.slug == "jupyterlab")).scalar_one()
        jupyter.command, jupyter.image = old, catalog.EARLIER_JUPYTER_IMAGE
        db.commit()
        seed_catalog(db, "kubernetes", IMAGE)
        db.refresh(jupyter)
        assert jupyter.command == list(catalog.JUPYTER_COMMAND) and jupyter.image == IMAGE


def test_seed_catalog_leaves_an_admins_catalog_alone(fresh_db: sessionmaker[Session]) -> None:
    with fresh_db() as db:
        db.add(Application(slug="only", name="Only", image="x"))
        db.commit()
        seed_catalog(db, "local", IMAGE)
        assert [a.slug for a in db.execute(select(Application)).scalars()] == ["only"]
        # deleting everything but an application a user still has? the admin decides: seeding
        # happens only on an empty catalog


def test_the_catalog_says_which_programs_are_missing_and_how_to_install_them(
    client: TestClient, admin: dict[str, str], alice: dict[str, str]
) -> None:
    apps = {a["slug"]: a for a in client.get(API, headers=alice).json()["items"]}
    # this session installs cmbcluster-core[jupyter]: JupyterLab is there, in the server's own environment
    assert apps["jupyterlab"]["available"] is True and apps["jupyterlab"]["unavailable_reason"] is None
    assert apps["files"]["available"] is True
    made = client.post(
        API, headers=admin, json={"slug": "jupyter-elsewhere", "name": "Elsewhere", "image": "x",
                                  "command": ["/nonexistent/bin/jupyter-lab", "--no-browser"]},
    )  # fmt: skip
    assert made.status_code == 201
    assert made.json()["available"] is False
    reason = made.json()["unavailable_reason"]
    assert reason.startswith("/nonexistent/bin/jupyter-lab is not installed on this server: ")
    assert 'pip install "cmbcluster-core[jupyter]" into' in reason
    listed = {a["slug"]: a for a in client.get(API, headers=alice).json()["items"]}
    assert listed["jupyter-elsewhere"]["unavailable_reason"] == reason  # users see it too, not a hidden entry
    refused = client.post("/api/v1/environments", headers=alice, json={"application": "jupyter-elsewhere"})
    assert refused.status_code == 409 and reason in refused.json()["message"]
    assert client.get("/api/v1/environments", headers=alice).json()["items"] == []


def test_seed_catalog_for_kubernetes(fresh_db: sessionmaker[Session]) -> None:
    with fresh_db() as db:
        seed_catalog(db, "kubernetes", IMAGE)
        apps = {app.slug: app for app in db.execute(select(Application)).scalars()}
    assert set(apps) == {"files", "jupyterlab"}  # the Streamlit example's file is in no image
    assert apps["jupyterlab"].active is True  # the image has it
    assert apps["files"].command[:3] == ["python", "-m", "http.server"]  # the image's interpreter, on a port


def test_seeded_applications_are_valid_catalog_entries() -> None:
    for backend in ("local", "kubernetes"):
        for app in catalog.default_applications(backend, IMAGE):
            catalog.ApplicationCreate.model_validate(app.model_dump())


def test_the_local_catalog_promises_no_package_the_servers_environment_may_lack() -> None:
    """Found by a newcomer: the local JupyterLab card promised NumPy, SciPy, pandas and matplotlib,
    which `./run serve` does not install (the local backend runs the server's own environment)."""
    local = {app.slug: app for app in catalog.default_applications("local", IMAGE)}
    in_image = {app.slug: app for app in catalog.default_applications("kubernetes", IMAGE)}
    for package in ("NumPy", "SciPy", "pandas", "matplotlib"):
        assert package not in local["jupyterlab"].summary
        assert package in in_image["jupyterlab"].summary  # the image the project builds has them
    assert "this server's own Python environment" in local["jupyterlab"].summary


def test_files_application_serves_the_working_directory_on_a_private_socket(tmp_path: Path) -> None:
    files = next(app for app in catalog.default_applications("local", IMAGE) if app.slug == "files")
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    (bucket / "results.txt").write_text("42\n")
    socket_path = str(tmp_path / "files.sock")
    values = LaunchValues(environment_id="e1", host="127.0.0.1", port=None, base_url="/environments/e1/",
                          socket=socket_path)  # fmt: skip
    command = render_command(files.command, values)
    process = subprocess.Popen(
        command, cwd=bucket, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 20
        with httpx.Client(transport=httpx.HTTPTransport(uds=socket_path), base_url="http://localhost") as client:
            while True:
                assert process.poll() is None, f"the Files application exited with {process.returncode}"
                try:
                    listing = client.get("/", timeout=2)
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "the Files application did not answer"
                    time.sleep(0.05)
            assert listing.status_code == 200
            assert "results.txt" in listing.text
            assert client.get("/results.txt", timeout=2).text == "42\n"
        assert os.stat(socket_path).st_mode & 0o077 == 0  # only this user opens it
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
