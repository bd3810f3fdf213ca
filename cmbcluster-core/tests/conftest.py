from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cmbcluster.app import create_app
from cmbcluster.settings import CoreSettings
from cmbcluster.testing.api import LOCAL, dev_sign_in
from cmbcluster.testing.process import clean_environ


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in set(os.environ) - set(clean_environ()):
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env from the developer's checkout


@pytest.fixture
def settings(tmp_path: Path) -> CoreSettings:
    return CoreSettings(data_dir=tmp_path / "data")


@pytest.fixture
def app(settings: CoreSettings) -> FastAPI:
    return create_app(settings)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, base_url=LOCAL) as test_client:
        try:
            yield test_client
        finally:  # environments are real processes: none may outlive its test, pass or fail
            compute = app.state.context.compute
            for status in compute.list_managed():
                compute.delete(status.environment_id)


@pytest.fixture
def admin(client: TestClient) -> dict[str, str]:
    """The first user to sign in, hence an admin: Authorization headers."""
    return dev_sign_in(client, "ada@example.org", "Ada Lovelace")


@pytest.fixture
def alice(client: TestClient, admin: dict[str, str]) -> dict[str, str]:
    return dev_sign_in(client, "alice@example.org", "Alice")


@pytest.fixture
def bob(client: TestClient, admin: dict[str, str]) -> dict[str, str]:
    return dev_sign_in(client, "bob@example.org", "Bob")
