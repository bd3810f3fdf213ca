"""Validating the whole configuration at once: ``cmbcluster config check`` and start-up.

Every problem is collected before anything starts, so an operator fixes them all in one go
instead of one traceback at a time.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from pydantic import AliasChoices, ValidationError
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
        message = err.get("msg", "invalid").removeprefix("Value error, ")
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
    core, cookie_problems, cookie_warnings = _cookie_domain(core, provider_settings.values())
    problems.extend(cookie_problems)
    warnings.extend(cookie_warnings)
    warnings.extend(_unknown_variables(core, pm))
    if "cloud_provider" not in core.model_fields_set and core.selected_compute == "local":
        clouds = sorted(n for n in pm.registrations("infra") if n != "local")
        if clouds:
            warnings.append(
                f"CLOUD_PROVIDER is not set: serving the embedded default (local) although cloud plugins are "
                f"installed ({', '.join(clouds)}); set CLOUD_PROVIDER to use one"
            )
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


def _cookie_domain(
    core: CoreSettings, provider_settings: Iterable[BaseSettings]
) -> tuple[CoreSettings, list[str], list[str]]:
    """With host routing (environments on ``<name>.<environments domain>``), the session cookie
    must reach those hosts for their access check: the cookie domain is a parent of both the
    public host and the environments domain. Derived when unset; refused when it cannot work
    (else every visit to an environment ends in a sign-in loop)."""
    domain = next(
        (d for d in (getattr(s, "environments_domain", None) for s in provider_settings) if isinstance(d, str) and d),
        None,
    )
    if domain is None:
        return core, [], []
    domain = domain.strip(".").lower()
    public_host = (urlsplit(core.public_url).hostname or "").lower() if core.public_url else ""
    if not public_host:
        return (
            core,
            ["host routing (CMBCLUSTER_ENVIRONMENTS_DOMAIN) needs CMBCLUSTER_PUBLIC_URL, the URL users reach"],
            [],
        )
    if _is_ip(public_host) or _is_ip(domain):
        return (
            core,
            [
                f"host routing needs DNS names, not IP addresses ({public_host}, *.{domain}): a wildcard record and a "
                "shared session cookie need names; or unset CMBCLUSTER_ENVIRONMENTS_DOMAIN for path routing"
            ],
            [],
        )
    if core.cookie_domain:
        cookie = core.cookie_domain.strip(".").lower()
        if not (_within(public_host, cookie) and _within(domain, cookie)):
            return (
                core,
                [
                    f"CMBCLUSTER_COOKIE_DOMAIN={core.cookie_domain} must be a parent of both {public_host} and "
                    f"{domain} (environments check access with the session cookie)"
                ],
                [],
            )
        return core, [], []
    shared = _common_parent(public_host, domain)
    if shared is None:
        return (
            core,
            [
                f"{public_host} and {domain} share no parent domain: the session cookie cannot reach the environments; "
                "put the environments domain under the control plane's domain (e.g. envs.example.org beside "
                "cmb.example.org) or unset CMBCLUSTER_ENVIRONMENTS_DOMAIN for path routing"
            ],
            [],
        )
    derived = core.model_copy(update={"cookie_domain": shared})
    return (
        derived,
        [],
        [f"CMBCLUSTER_COOKIE_DOMAIN is not set: using {shared}, the parent of {public_host} and {domain}"],
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _within(host: str, parent: str) -> bool:
    return host == parent or host.endswith("." + parent)


def _common_parent(a: str, b: str) -> str | None:
    """The longest domain both are within, of two labels at least (never a bare top-level domain)."""
    left, right = a.split("."), b.split(".")
    shared: list[str] = []
    while left and right and left[-1] == right[-1]:
        shared.insert(0, left.pop())
        right.pop()
    return ".".join(shared) if len(shared) >= 2 else None


def _unknown_variables(core: CoreSettings, pm: PluginManager) -> list[str]:
    """CMBCLUSTER_* variables no installed settings model reads: most often a misspelt name."""
    known: set[str] = set()
    models: list[type[BaseSettings]] = [CoreSettings]
    for concern in ("storage", "auth", "infra", "compute"):
        models += [r.settings_model for r in pm.registrations(concern).values() if r.settings_model is not None]
    for model in models:
        for field in model.model_fields.values():
            alias = field.validation_alias
            names = alias.choices if isinstance(alias, AliasChoices) else [alias] if isinstance(alias, str) else []
            known.update(n.upper() for n in names if isinstance(n, str))
    set_here = {name.upper() for name in os.environ} | set(_dotenv_names(core))
    unknown = sorted(n for n in set_here if n.startswith("CMBCLUSTER_") and n not in known | _NOT_SETTINGS)
    found = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        found.append(f"{name} is not a setting of CMBCluster or of an installed plugin{hint}")
    return found


#: CMBCLUSTER_* variables that are not settings: read by the tools around the server.
_NOT_SETTINGS = frozenset({"CMBCLUSTER_HELM", "CMBCLUSTER_HELM_CHART", "CMBCLUSTER_EXTRAS", "CMBCLUSTER_PYTHON"})


def _dotenv_names(core: CoreSettings) -> list[str]:
    env_file = _env_file(core)
    if not env_file or not os.path.isfile(env_file):
        return []
    names = []
    for line in Path(env_file).read_text(errors="replace").splitlines():
        name, sep, _ = line.removeprefix("export ").partition("=")
        if sep and name.strip() and not name.lstrip().startswith("#"):
            names.append(name.strip().upper())
    return names


def _env_file(core: CoreSettings) -> str | None:
    env_file = core.model_config.get("env_file")
    return str(env_file) if isinstance(env_file, (str, os.PathLike)) else None
