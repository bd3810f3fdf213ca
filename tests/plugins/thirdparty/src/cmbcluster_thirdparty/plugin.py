"""A storage backend from outside the project, registered through the public plugin API.

To stay small it reuses core's folder storage; a real plugin implements StorageBackend itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings

from cmbcluster import ProviderContext, StorageBackendRegistration, hookimpl
from cmbcluster.errors import ProviderUnavailable
from cmbcluster.local.storage import LocalStorage

CMBCLUSTER_PLUGIN_API = ">=1.0,<2"


class ThirdPartySettings(BaseSettings):
    thirdparty_root: Path = Field(validation_alias="THIRDPARTY_ROOT")


class ThirdPartyStorage(LocalStorage):
    """Buckets in THIRDPARTY_ROOT; readiness leaves a trace so tests can see it was used."""

    def check_ready(self) -> None:
        if not self.root.is_dir():
            raise ProviderUnavailable(f"{self.root} is gone")
        (self.root / "used-by-control-plane").touch()


def _factory(ctx: ProviderContext) -> ThirdPartyStorage:
    return ThirdPartyStorage(ctx.require_settings(ThirdPartySettings).thirdparty_root)


@hookimpl
def cmbcluster_storage_backends() -> Iterator[StorageBackendRegistration]:
    yield StorageBackendRegistration(name="thirdparty", factory=_factory, settings_model=ThirdPartySettings)
