"""One lifecycle for every provider: each has close(), and the control plane closes all of them."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from cmbcluster.config import resolve
from cmbcluster.context import build_context
from cmbcluster.interfaces import AuthProvider, ComputeBackend, InfraProvider, Provisioner, StorageBackend
from cmbcluster.oidc import OidcConfig, OidcProvider
from cmbcluster.settings import CoreSettings


@pytest.mark.parametrize("interface", [StorageBackend, ComputeBackend, InfraProvider, AuthProvider, Provisioner])
def test_every_provider_interface_has_close(interface: type) -> None:
    assert callable(getattr(interface, "close", None))
    assert "close" not in getattr(interface, "__abstractmethods__", ())  # optional: nothing to release by default


def test_the_app_context_closes_every_provider_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    context = build_context(resolve(CoreSettings(data_dir=tmp_path)))
    context.storage_runtime  # noqa: B018 - made, so that it is closed too
    closed: list[str] = []
    for concern, name, provider in context.providers():
        monkeypatch.setattr(provider, "close", lambda concern=concern, name=name: closed.append(f"{concern}:{name}"))
    monkeypatch.setattr(context.storage_runtime, "close", lambda: closed.append("storage runtime"))
    context.close()
    assert closed == ["storage runtime", "storage:local", "compute:local", "infra:local", "auth:local"]


def test_a_failing_close_does_not_keep_the_others_from_closing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    context = build_context(resolve(CoreSettings(data_dir=tmp_path)))
    closed: list[str] = []

    def broken() -> None:
        raise RuntimeError("stuck")

    monkeypatch.setattr(context.storage, "close", broken)
    monkeypatch.setattr(context.infra, "close", lambda: closed.append("infra"))
    context.close()
    assert closed == ["infra"]


def test_the_oidc_provider_closes_only_the_http_client_it_made() -> None:
    config = OidcConfig(name="oidc", issuer="https://issuer.example.org", client_id="cmb")
    own = OidcProvider(config)
    own.close()
    assert own._http.is_closed
    given = httpx.Client()
    borrowed = OidcProvider(config, http=given)
    borrowed.close()
    assert not given.is_closed
    given.close()
