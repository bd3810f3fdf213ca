"""Validating the whole configuration at once: ``cmbcluster config check`` and start-up.

Every problem is collected before anything starts, so an operator fixes them all in one go
instead of one traceback at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings

from cmbcluster.errors import ConfigurationError, PluginError
from cmbcluster.plugins import PluginManager
from cmbcluster.registrations import (
    AuthProviderRegistration,
    ComputeBackendRegistration,
    InfraProviderRegistration,
    ProviderContext,
    Registration,
    StorageBackendRegistration,
)
from cmbcluster.settings import CoreSettings, env_var_name

R = TypeVar("R", bound=Registration[Any])
S = TypeVar("S", bound=BaseSettings)


@dataclass
class ResolvedConfig:
    """A validated configuration: core settings, the chosen registrations and their settings."""

    core: CoreSettings
    plugins: PluginManager
    storage: StorageBackendRegistration
    compute: ComputeBackendRegistration
    infra: InfraProviderRegistration
    auth: list[AuthProviderRegistration]
    provider_settings: dict[type[BaseSettings], BaseSettings] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def context_for(self, registration: Registration[Any]) -> ProviderContext:
        model = registration.settings_model
        return ProviderContext(
            core=self.core,
            provider_settings=self.provider_settings.get(model) if model else None,
            decorate_pod=self.plugins.decorate_pod,
            active_settings=dict(self.provider_settings),
        )

    def settings(self, model: type[S]) -> S | None:
        """The validated settings of ``model`` when an active provider uses it (else None):
        ``config.settings(AwsSettings)`` in a hook that acts only where its cloud is active."""
        found = self.provider_settings.get(model)
        return found if isinstance(found, model) else None

    def summary(self) -> dict[str, str]:
        return {
            "storage": self.storage.name,
            "compute": self.compute.name,
            "infra": self.infra.name,
            "auth": ",".join(a.name for a in self.auth),
        }


def format_validation_error(model: type[BaseSettings], exc: ValidationError) -> list[str]:
    """One line per problem, naming the environment variable the operator must set."""
    problems = []
    for err in exc.errors():
        loc = err.get("loc") or ("",)
        name = env_var_name(model, str(loc[0])) if loc and loc[0] else model.__name__
        message = err.get("msg", "invalid")
        if err.get("type") == "missing":
            message = "is required but not set"
        problems.append(f"{name} {message} ({model.__name__})")
    return problems


def load_core_settings(**overrides: Any) -> CoreSettings:
    """Core settings from the environment and ``.env``; ConfigurationError lists every problem."""
    try:
        return CoreSettings(**overrides)
    except ValidationError as exc:
        raise ConfigurationError(format_validation_error(CoreSettings, exc)) from None


def resolve(core: CoreSettings, plugins: PluginManager | None = None) -> ResolvedConfig:
    """Check everything; raise one ConfigurationError listing every problem."""
    problems: list[str] = []
    warnings: list[str] = []
    try:
        pm = (plugins or PluginManager.from_settings(core)).load()
    except PluginError as exc:
        raise ConfigurationError([str(exc)]) from None
    for info in pm.failed():
        warnings.append(f"plugin {info.name} ({info.distribution} {info.version}) not loaded: {info.error}")

    def pick(select: Callable[[str], R], name: str) -> R | None:
        try:
            return select(name)
        except PluginError as exc:
            problems.append(str(exc))
            return None

    try:
        pm.check_conflicts()
    except PluginError as exc:
        raise ConfigurationError([str(exc)]) from None

    storage = pick(pm.storage_backend, core.selected_storage)
    compute = pick(pm.compute_backend, core.selected_compute)
    infra = pick(pm.infra_provider, core.selected_infra)
    auth = [pick(pm.auth_provider, name) for name in core.selected_auth]
    if not core.selected_auth:
        problems.append("CMBCLUSTER_AUTH_PROVIDERS enables no identity provider: nobody could sign in")

    chosen: list[Registration[Any]] = [r for r in [storage, compute, infra, *auth] if r is not None]
    provider_settings: dict[type[BaseSettings], BaseSettings] = {}
    for registration in chosen:
        model = registration.settings_model
        if model is None or model in provider_settings:
            continue
        try:
            provider_settings[model] = model(_env_file=_env_file(core))
        except ValidationError as exc:
            problems.extend(format_validation_error(model, exc))

    if "local" in core.selected_auth and not core.serves_loopback_only and not core.dev_login_allow_remote:
        problems.append(
            f"the development sign-in (auth provider 'local') refuses to serve on {core.host}, beyond loopback; "
            "configure a real identity provider, or set CMBCLUSTER_DEV_LOGIN_ALLOW_REMOTE=1 if you really mean it"
        )
    problems.extend(_database_problems(core))
    if core.selected_compute != "local" and core.secret_key is None:
        warnings.append(
            "CMBCLUSTER_SECRET_KEY is not set: a key is generated into the data directory, on the same volume as the "
            "database it protects; set it from a Kubernetes Secret or your secret manager (docs/operators/security.md)"
        )

    if problems:
        raise ConfigurationError(problems)
    assert storage is not None and compute is not None and infra is not None
    return ResolvedConfig(
        core=core,
        plugins=pm,
        storage=storage,
        compute=compute,
        infra=infra,
        auth=[a for a in auth if a is not None],
        provider_settings=provider_settings,
        warnings=warnings,
    )


def _env_file(core: CoreSettings) -> str | None:
    env_file = core.model_config.get("env_file")
    return str(env_file) if isinstance(env_file, (str, os.PathLike)) else None


def _database_problems(core: CoreSettings) -> list[str]:
    url = core.effective_database_url
    if not url.startswith("sqlite"):
        return []
    path = Path(url.split("///", 1)[-1]) if "///" in url else None
    if path is None or str(path) in {"", ":memory:"}:
        return []
    fstype = filesystem_type(path.parent if not path.exists() else path)
    if fstype and (fstype.startswith("fuse") or fstype in {"nfs", "nfs4", "cifs", "smb3"}):
        return [
            f"the SQLite database {path} is on a {fstype} file system; SQLite needs a local disk "
            "(file locks and WAL do not work on FUSE or network mounts): move CMBCLUSTER_DATA_DIR "
            "or use CMBCLUSTER_DATABASE_URL=postgresql://..."
        ]
    return []


def filesystem_type(path: Path) -> str | None:
    """The file system type holding ``path`` (Linux /proc/mounts), or None when unknown."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target = path.resolve()
    while not target.exists() and target != target.parent:
        target = target.parent
    best, best_type = "", None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount_point = parts[1].replace("\\040", " ")
        if (str(target) == mount_point or str(target).startswith(mount_point.rstrip("/") + "/")) and len(
            mount_point
        ) > len(best):
            best, best_type = mount_point, parts[2]
    return best_type
