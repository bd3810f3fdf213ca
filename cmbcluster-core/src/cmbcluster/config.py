"""Validating the whole configuration at once: ``cmbcluster config check`` and start-up.

Every problem is collected before anything starts, so an operator fixes them all in one go
instead of one traceback at a time.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import AliasChoices, ValidationError
from pydantic_settings import BaseSettings

from cmbcluster.db.engine import database_url_problems
from cmbcluster.errors import ConfigurationError, PluginError
from cmbcluster.plugins import CONCERNS, PluginManager, PluginsFailed
from cmbcluster.registrations import Concern, Registration, ResolvedConfig
from cmbcluster.settings import CoreSettings, env_var_name, env_var_names

R = TypeVar("R", bound=Registration[Any])

__all__ = ["ResolvedConfig", "format_validation_error", "load_core_settings", "resolve"]


def format_validation_error(model: type[BaseSettings], exc: ValidationError) -> list[str]:
    """One line per problem, naming the environment variable the operator must set."""
    problems = []
    for err in exc.errors():
        loc = err.get("loc") or ("",)
        message = err.get("msg", "invalid").removeprefix("Value error, ")
        if err.get("type") == "missing":
            message = "is required but not set"
        # A model's own check (no field) names its variables in its message: the model is named once, last.
        name = f"{env_var_name(model, str(loc[0]))} " if loc and loc[0] else ""
        problems.append(f"{name}{message} ({model.__name__})")
    return problems


def load_core_settings(**overrides: Any) -> CoreSettings:
    """Core settings from the environment and ``.env``; ConfigurationError lists every problem."""
    try:
        return CoreSettings(**overrides)
    except ValidationError as exc:
        raise ConfigurationError(format_validation_error(CoreSettings, exc)) from None


def resolve(
    core: CoreSettings, plugins: PluginManager | None = None, *, concerns: Iterable[Concern] = tuple(CONCERNS)
) -> ResolvedConfig:
    """Check everything; raise one ConfigurationError listing every problem, each once.

    ``concerns`` are those the caller will use: the variables a registration ``requires`` are
    checked for those only (``cmbcluster infra`` needs no sign-in settings).
    """
    needed = set(concerns)
    problems: list[str] = []
    warnings: list[str] = []
    try:
        pm = (plugins or PluginManager.from_settings(core)).load()
        pm.check_conflicts()  # also when the manager was loaded (and its conflict raised) before
    except PluginsFailed as exc:
        raise ConfigurationError(exc.failures) from None
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

    storage = pick(pm.storage_backend, core.selected_storage)
    compute = pick(pm.compute_backend, core.selected_compute)
    infra = pick(pm.infra_provider, core.selected_infra)
    auth = [pick(pm.auth_provider, name) for name in core.selected_auth]  # never empty: CLOUD_PROVIDER's by default

    by_concern: list[tuple[Concern, Registration[Any] | None]] = [
        ("storage", storage), ("compute", compute), ("infra", infra), *(("auth", a) for a in auth)
    ]  # fmt: skip
    chosen: list[tuple[Concern, Registration[Any]]] = [(c, r) for c, r in by_concern if r is not None]
    provider_settings: dict[type[BaseSettings], BaseSettings] = {}
    #: fields of each model that failed validation (reported already)
    invalid: dict[type[BaseSettings], set[str]] = {}
    for _, registration in chosen:
        model = registration.settings_model
        if model is None or model in provider_settings or model in invalid:
            continue  # one model may serve every concern: validated (and reported) once
        try:
            provider_settings[model] = model(_env_file=_env_file(core))
        except ValidationError as exc:
            problems.extend(format_validation_error(model, exc))
            invalid[model] = {str(e["loc"][0]) for e in exc.errors() if e.get("loc")}
    problems.extend(
        _unset_requirements([(c, r) for c, r in chosen if c in needed], provider_settings, invalid, _set_names(core))
    )

    if "local" in core.selected_auth and not core.serves_loopback_only and not core.dev_login_allow_remote:
        problems.append(
            f"the development sign-in (auth provider 'local') refuses to serve on {core.host}, beyond loopback; "
            "configure a real identity provider, or set CMBCLUSTER_DEV_LOGIN_ALLOW_REMOTE=1 if you really mean it"
        )
    problems.extend(database_url_problems(core.effective_database_url))  # a driver not installed, a FUSE mount
    routing_problems, routing_warnings = _host_routing(core, provider_settings.values())
    problems.extend(routing_problems)
    warnings.extend(routing_warnings)
    warnings.extend(_unknown_variables(core, pm))
    warnings.extend(_unused_variables(core, pm, [registration for _, registration in chosen]))
    # Only when nothing chose a provider: a deployment that names a plugin for one concern
    # (CMBCLUSTER_STORAGE_BACKEND=azure) is not serving the embedded default by mistake.
    selected = {core.selected_storage, core.selected_compute, core.selected_infra, *core.selected_auth}
    if "cloud_provider" not in core.model_fields_set and selected == {"local"}:
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
        raise ConfigurationError(list(dict.fromkeys(problems)))
    assert storage is not None and compute is not None and infra is not None
    config = ResolvedConfig(
        core=core,
        plugins=pm,
        storage=storage,
        compute=compute,
        infra=infra,
        auth=[a for a in auth if a is not None],
        provider_settings=provider_settings,
        warnings=warnings,
    )
    warnings.extend(_unused_price_tables(config, set(pm.registrations("infra"))))
    return config


def _unused_price_tables(config: ResolvedConfig, infra_names: set[str]) -> list[str]:
    """A price table is chosen by the configured infra provider's name: one naming no registered
    infra provider is never used, which would otherwise go unnoticed."""
    found = []
    for plugin_name, table in config.plugins.price_tables(config):
        provider = getattr(table, "provider", None)
        if isinstance(provider, str) and provider not in infra_names:
            found.append(
                f"plugin {plugin_name!r} prices provider {provider!r}, but no infra provider is registered under "
                "that name: its prices are not used (usage is priced by the infra provider's name, now "
                f"{config.infra.name!r})"
            )
    return found


def _unset_requirements(
    chosen: Iterable[tuple[Concern, Registration[Any]]],
    provider_settings: Mapping[type[BaseSettings], BaseSettings],
    invalid: Mapping[type[BaseSettings], set[str]],
    set_names: set[str],
) -> list[str]:
    """Each variable a selected registration ``requires`` but is unset, once, naming who needs it.

    Also for a model that failed validation on other fields: every missing variable is named in
    one run, not one concern's after another's are fixed."""
    needers: dict[tuple[type[BaseSettings], str], list[str]] = {}
    for _, registration in chosen:
        model = registration.settings_model
        if model is None:
            continue
        settings = provider_settings.get(model)
        for name in registration.requires:
            if settings is not None:
                unset = getattr(settings, name, None) in (None, "")
            else:  # the model failed validation: its other problems are reported; this one from the variables
                unset = name not in invalid.get(model, set()) and env_var_name(model, name).upper() not in set_names
            if unset:
                needers.setdefault((model, name), []).append(f"{registration.kind} {registration.name!r}")
    return [
        f"{env_var_name(model, name)} is required by the {', '.join(dict.fromkeys(who))} but not set ({model.__name__})"
        for (model, name), who in needers.items()
    ]


def _host_routing(core: CoreSettings, provider_settings: Iterable[BaseSettings]) -> tuple[list[str], list[str]]:
    """Problems and warnings of host routing (environments on ``<name>.<environments domain>``):
    the ingress sends a browser not yet signed in to an environment to the control plane's public
    URL (``enter``), and a wildcard DNS record and certificate need a name."""
    warnings = []
    if core.cookie_domain:
        warnings.append(
            f"CMBCLUSTER_COOKIE_DOMAIN={core.cookie_domain} is no longer used: the session cookie stays on the "
            "control plane's host, and an environment on a host of its own gets a cookie of that host; remove it"
        )
    domain = next(
        (d for d in (getattr(s, "environments_domain", None) for s in provider_settings) if isinstance(d, str) and d),
        None,
    )
    if domain is None:
        return [], warnings
    domain = domain.strip(".").lower()
    if not core.public_url:
        needs = "host routing (CMBCLUSTER_ENVIRONMENTS_DOMAIN) needs CMBCLUSTER_PUBLIC_URL, the URL users reach"
        return [needs], warnings
    if _is_ip(domain):
        return [
            f"host routing needs a DNS name, not an IP address ({domain}): environments are served at "
            f"env-<id>.{domain} (a wildcard record); or unset CMBCLUSTER_ENVIRONMENTS_DOMAIN for path routing"
        ], warnings
    if not _DOMAIN_NAME.fullmatch(domain):
        return [
            f"CMBCLUSTER_ENVIRONMENTS_DOMAIN={domain} is not a domain name: environments are served at "
            "env-<id>.<domain>; give the bare name (envs.example.org), without a scheme, wildcard, port or path"
        ], warnings
    if not core.public_url.startswith("https://"):
        warnings.append(
            f"host routing with an http CMBCLUSTER_PUBLIC_URL ({core.public_url}): without https the session cookie "
            "cannot be a __Host- cookie, and a page on another host of the domain can plant one; use https"
        )
    return [], warnings


#: a DNS name of two labels or more (letters, digits and inner hyphens), as a wildcard record needs
_DOMAIN_NAME = re.compile(
    r"(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _unknown_variables(core: CoreSettings, pm: PluginManager) -> list[str]:
    """CMBCLUSTER_* variables no installed settings model reads: most often a misspelt name."""
    known: set[str] = set()
    models: list[type[BaseSettings]] = [CoreSettings, *pm.settings_models()]
    for model in models:
        known |= env_var_names(model)[0]
    set_here = {name.upper() for name in os.environ} | set(_dotenv_names(core))
    unknown = sorted(n for n in set_here if n.startswith("CMBCLUSTER_") and n not in known | _NOT_SETTINGS)
    found = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        found.append(f"{name} is not a setting of CMBCluster or of an installed plugin{hint}")
    return found


#: CMBCLUSTER_* variables that are not settings: read by the tools around the server.
def _unused_variables(core: CoreSettings, pm: PluginManager, active: list[Registration[Any]]) -> list[str]:
    """CMBCLUSTER_* variables set that only providers not in use read (CMBCLUSTER_ROUTING with the
    local compute backend): the operator expects them to change something, and they change nothing."""
    read = set(env_var_names(CoreSettings)[0])
    for registration in active:
        if registration.settings_model is not None:
            read |= env_var_names(registration.settings_model)[0]
    readers: dict[str, list[str]] = {}
    for _, _, registration in pm.registered():
        if registration.settings_model is None or registration in active:
            continue
        for name in env_var_names(registration.settings_model)[0]:
            readers.setdefault(name, []).append(f"{registration.kind} {registration.name!r}")
    found = []
    for name in sorted(n for n in _set_names(core) if n.startswith("CMBCLUSTER_") and n not in read and n in readers):
        who = " and ".join(dict.fromkeys(readers[name]))
        found.append(f"{name} is set but nothing in use reads it: it is a setting of the {who}, not selected here")
    return found


_NOT_SETTINGS = frozenset({
    "CMBCLUSTER_HELM", "CMBCLUSTER_HELM_CHART", "CMBCLUSTER_EXTRAS", "CMBCLUSTER_PYTHON",
    # command-line options' own variables (`cmbcluster infra --state-dir`, `--kubeconfig`)
    "CMBCLUSTER_INFRA_STATE_DIR", "CMBCLUSTER_INFRA_KUBECONFIG",
})  # fmt: skip


def _set_names(core: CoreSettings) -> set[str]:
    """The variables set (non-empty) in the environment or in ``.env``, upper-case."""
    return {name.upper() for name, value in os.environ.items() if value} | set(_dotenv_names(core))


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


# -- the commented .env of every installed settings model (cmbcluster config example) ---------------
EXAMPLE_HEADER = """\
# CMBCluster configuration: every setting of core and of the installed plugins, with its description,
# its default and what needs it. Generated by `cmbcluster config example` (the repository's .env.example
# is its output with cmbcluster-aws and cmbcluster-gcp installed, kept current by a test).
# Copy it to .env, uncomment what you set, and run `cmbcluster config check`.
"""


def example_env(plugins: PluginManager, cloud: str | None = None) -> str:
    """A commented ``.env`` from core's settings and every registered settings model (only those of
    the plugin or provider called ``cloud`` when given)."""
    registered = plugins.registered()
    if cloud is not None:
        registered = [(p, c, r) for p, c, r in registered if cloud in (p, r.name)]
        if not registered:
            installed = sorted({p for p, _, _ in plugins.registered()})
            raise ConfigurationError(
                [f"no installed plugin or provider is called {cloud!r} (installed plugins: {', '.join(installed)})"]
            )
    users: dict[type[BaseSettings], list[Registration[Any]]] = {}
    for _, _, registration in registered:
        if registration.settings_model is not None and registration.settings_model is not CoreSettings:
            users.setdefault(registration.settings_model, []).append(registration)
    sections = [EXAMPLE_HEADER, _example_section(CoreSettings, "core: every deployment", [])]
    for model, registrations in users.items():
        used_by = ", ".join(f"{r.kind} {r.name!r}" for r in registrations)
        sections.append(_example_section(model, f"used by the {used_by}", registrations))
    return "\n".join(sections)


def _example_section(model: type[BaseSettings], heading: str, registrations: list[Registration[Any]]) -> str:
    lines = [f"# ===== {model.__name__} ({heading}) ====="]
    for field_name, field in model.model_fields.items():
        name = env_var_name(model, field_name)
        alias = field.validation_alias
        others = [a for a in alias.choices[1:] if isinstance(a, str)] if isinstance(alias, AliasChoices) else []
        needed_by = [f"{r.kind} {r.name!r}" for r in registrations if field_name in r.requires]
        notes = [field.description.rstrip(".") + "." if field.description else ""]
        if field.is_required():
            notes.append("Required.")
        elif needed_by:
            notes.append(f"Required by the {', '.join(needed_by)}.")
        if others:
            notes.append(f"Also read as {', '.join(others)}.")
        lines.append("")
        lines.extend(f"# {line}" for line in _wrap(" ".join(n for n in notes if n)))
        lines.append(f"# {name}={_example_value(field)}")
    return "\n".join(lines) + "\n"


def _example_value(field: Any) -> str:
    if field.is_required():
        return ""
    if field.default_factory is not None:
        value = field.default_factory()
        if not isinstance(value, (list, tuple, dict)):
            return ""  # computed where it runs (the data directory): nothing to copy
    else:
        value = field.default
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _wrap(text: str, width: int = 98) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) if text else []
