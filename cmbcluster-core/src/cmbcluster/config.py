"""Validating the whole configuration at once: ``cmbcluster config check`` and start-up.

Every problem is collected before anything starts, so an operator fixes them all in one go
instead of one traceback at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings

from cmbcluster.db.engine import sqlite_location_problems
from cmbcluster.errors import ConfigurationError, PluginError
from cmbcluster.plugins import PluginManager
from cmbcluster.registrations import Registration, ResolvedConfig
from cmbcluster.settings import CoreSettings, env_var_name

R = TypeVar("R", bound=Registration[Any])

__all__ = ["ResolvedConfig", "format_validation_error", "load_core_settings", "resolve"]


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
    problems.extend(sqlite_location_problems(core.effective_database_url))
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
