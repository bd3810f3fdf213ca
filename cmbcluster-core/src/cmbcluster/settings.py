"""Core settings (pydantic-settings). Each provider adds its own model (see registrations).

The environment variable names of the original deployment keep working: every field lists its
accepted names in ``validation_alias``, the ``CMBCLUSTER_`` name first.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: Put on a settings field (``Field(..., json_schema_extra=LOCAL_ONLY)``): it belongs to the
#: operator's own machine (an emulator's endpoint, a personal access token) and `cmbcluster deploy`
#: never sends it into a deployment.
LOCAL_ONLY: dict[str, Any] = {"cmbcluster_deploy": "local-only"}
#: Put on a boolean settings field: a development switch; `cmbcluster deploy` refuses to send it on.
DEVELOPMENT_ONLY: dict[str, Any] = {"cmbcluster_deploy": "development"}


def deploy_policy(model: type[BaseSettings], field_name: str) -> str | None:
    """``local-only``, ``development`` or None (sent like any setting), from the field's marker."""
    field = model.model_fields.get(field_name)
    extra = field.json_schema_extra if field is not None else None
    value = extra.get("cmbcluster_deploy") if isinstance(extra, dict) else None
    return value if isinstance(value, str) else None


def _aliases(*names: str) -> AliasChoices:
    return AliasChoices(*names)


def check_node_range(model: BaseSettings, count_field: str, most_field: str, pool: str) -> None:
    """For a cloud plugin's settings (a model validator): a node pool's maximum (``most_field``)
    is not below the count it starts with (``count_field``), as `config check` says before `infra
    up` would clamp or refuse it. ``pool`` names it in the message ("node group", "node pool")."""
    count, most = getattr(model, count_field), getattr(model, most_field)
    if most < count:
        names = {field: env_var_name(type(model), field) for field in (count_field, most_field)}
        raise PydanticCustomError(
            "node_range", "{most_name} ({most}) is below {count_name} ({count}): the {pool} could not start with "
            "its nodes", {"most_name": names[most_field], "most": most, "count_name": names[count_field],
                          "count": count, "pool": pool},
        )  # fmt: skip


def _not_a_proxy_address(entry: str) -> str:
    try:  # a network written with its host's address: say which network it means
        return f"{entry!r} has bits set past its prefix: did you mean {ipaddress.ip_network(entry, strict=False)}?"
    except ValueError:
        return f"{entry!r} is not an IP address or network (host names are not resolved)"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "cmbcluster"


CommaList = Annotated[list[str], NoDecode]


class CoreSettings(BaseSettings):
    """Settings of the control plane itself. Read from the environment and ``.env``."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True)

    cloud_provider: str = Field(
        default="local",
        validation_alias=_aliases("CMBCLUSTER_CLOUD_PROVIDER", "CLOUD_PROVIDER"),
        description="The provider used for every concern unless overridden: local, aws, gcp, or a plugin's name.",
    )
    storage_backend: str | None = Field(
        default=None, validation_alias=_aliases("CMBCLUSTER_STORAGE_BACKEND"), description="Override: storage backend."
    )
    auth_providers: CommaList | None = Field(
        default=None,
        validation_alias=_aliases("CMBCLUSTER_AUTH_PROVIDERS"),
        description="Override: comma-separated identity providers to enable.",
    )
    infra_provider: str | None = Field(
        default=None, validation_alias=_aliases("CMBCLUSTER_INFRA_PROVIDER"), description="Override: infra provider."
    )
    compute_backend: str | None = Field(
        default=None,
        validation_alias=_aliases("CMBCLUSTER_COMPUTE_BACKEND"),
        description="Override: compute backend (default: local for the local provider, kubernetes otherwise).",
    )

    data_dir: Path = Field(
        default_factory=default_data_dir, validation_alias=_aliases("CMBCLUSTER_DATA_DIR"),
        description="Where the server keeps its state: the SQLite database and the secret key unless they are "
        "set, `cmbcluster infra`'s record, the local provider's buckets, homes and environments. Default: "
        "$XDG_DATA_HOME/cmbcluster, else ~/.local/share/cmbcluster. Put it on a local disk: SQLite's locks fail on "
        "FUSE and network mounts.",
    )  # fmt: skip
    database_url: str | None = Field(
        default=None,
        validation_alias=_aliases("CMBCLUSTER_DATABASE_URL", "DATABASE_URL"),
        description="SQLAlchemy URL; default: SQLite in the data directory.",
    )
    # One setting for every cloud: the original deployments' names are aliases (see db/backup.py).
    database_bucket: str | None = Field(
        default=None,
        validation_alias=_aliases(
            "CMBCLUSTER_DATABASE_BUCKET", "S3_DATABASE_BUCKET", "GCS_DATABASE_BUCKET", "DATABASE_BUCKET"
        ),
        description="Bucket of the active storage backend that receives SQLite backups; unset: no backups.",
    )
    database_backup_prefix: str = Field(
        default="cmbcluster-db/", validation_alias=_aliases("CMBCLUSTER_DATABASE_BACKUP_PREFIX"),
        description="Where in the database bucket the backups go.",
    )  # fmt: skip
    database_backup_interval_minutes: float = Field(
        default=60, ge=0, validation_alias=_aliases("CMBCLUSTER_DATABASE_BACKUP_INTERVAL_MINUTES"),
        description="How often the server backs up a changed database; 0: only on demand.",
    )  # fmt: skip
    database_stop_backup_seconds: float = Field(
        default=10, gt=0, le=600, validation_alias=_aliases("CMBCLUSTER_DATABASE_STOP_BACKUP_SECONDS"),
        description="How long a stopping server waits for its final backup (storage may be down) before it stops.",
    )  # fmt: skip
    database_backups_kept: int = Field(
        default=48, ge=0, validation_alias=_aliases("CMBCLUSTER_DATABASE_BACKUPS_KEPT"),
        description="Newest backups kept; older ones are deleted after each backup. 0: keep all.",
    )  # fmt: skip
    host: str = Field(
        default="127.0.0.1", validation_alias=_aliases("CMBCLUSTER_HOST"),
        description="Address `cmbcluster serve` listens on (`--host` overrides it); 0.0.0.0: every interface. "
        "Beyond loopback, the development sign-in is refused (see CMBCLUSTER_DEV_LOGIN_ALLOW_REMOTE).",
    )  # fmt: skip
    port: int = Field(
        default=8000, ge=1, le=65535, validation_alias=_aliases("CMBCLUSTER_PORT"),
        description="Port `cmbcluster serve` listens on (`--port` overrides it).",
    )  # fmt: skip
    public_url: str | None = Field(
        default=None, validation_alias=_aliases("CMBCLUSTER_PUBLIC_URL", "API_URL"), description="URL users reach."
    )
    forwarded_allow_ips: str = Field(
        default="127.0.0.1",
        validation_alias=_aliases("CMBCLUSTER_FORWARDED_ALLOW_IPS", "FORWARDED_ALLOW_IPS"),
        description="Proxies whose X-Forwarded-For/-Proto headers are believed (comma-separated IP addresses or "
        "networks, * for any, empty for none): behind an ingress, its addresses, so that sign-in limits count each "
        "client apart.",
    )
    cookie_domain: str | None = Field(
        default=None,
        validation_alias=_aliases("CMBCLUSTER_COOKIE_DOMAIN"),
        description="No longer used (config check warns): the session cookie stays on the control plane's host, "
        "and an environment on a host of its own (host routing) gets a cookie of that host.",
    )
    secret_key: SecretStr | None = Field(
        default=None,
        validation_alias=_aliases("CMBCLUSTER_SECRET_KEY", "SECRET_KEY"),
        description="Signs sessions and encrypts secret files; generated into the data directory when unset.",
    )
    secret_key_previous: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        validation_alias=_aliases("CMBCLUSTER_SECRET_KEY_PREVIOUS"),
        description="During a key rotation: the former key(s), comma-separated. They still decrypt stored "
        "secrets until `cmbcluster secrets reencrypt` has re-sealed everything with CMBCLUSTER_SECRET_KEY.",
    )
    admin_emails: CommaList = Field(
        default_factory=list, validation_alias=_aliases("CMBCLUSTER_ADMIN_EMAILS", "ADMIN_EMAILS"),
        description="Comma-separated e-mail addresses made administrators when they sign in, if their identity "
        "provider verified the address; one taken off the list is a plain user again from its next sign-in.",
    )  # fmt: skip
    dev_login_allow_remote: bool = Field(
        default=False,
        validation_alias=_aliases("CMBCLUSTER_DEV_LOGIN_ALLOW_REMOTE"),
        description="Let the development sign-in serve beyond loopback (never in production).",
        json_schema_extra=DEVELOPMENT_ONLY,
    )
    plugins_strict: bool = Field(
        default=False, validation_alias=_aliases("CMBCLUSTER_PLUGINS_STRICT"),
        description="A plugin that fails to load stops the server and `config check`, every failure named at "
        "once, instead of being skipped with a warning (`cmbcluster plugins` says why it did not load).",
    )  # fmt: skip
    plugins_allow: CommaList | None = Field(
        default=None, validation_alias=_aliases("CMBCLUSTER_PLUGINS_ALLOW"),
        description="Comma-separated names of the installed plugins to load (`cmbcluster plugins` lists them); "
        "the others are skipped, the built-in local, oidc and kubernetes always load. Unset: all.",
    )  # fmt: skip
    plugins_block: CommaList = Field(
        default_factory=list, validation_alias=_aliases("CMBCLUSTER_PLUGINS_BLOCK"),
        description="Comma-separated names of plugins never to load, built-in ones included.",
    )  # fmt: skip
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", validation_alias=_aliases("CMBCLUSTER_LOG_LEVEL", "LOG_LEVEL"),
        description="The least severe log lines written: DEBUG, INFO, WARNING or ERROR.",
    )  # fmt: skip
    access_log: bool = Field(
        default=False, validation_alias=_aliases("CMBCLUSTER_ACCESS_LOG"),
        description="true: a log line for every request answered (client address, method, path, status), at "
        "INFO, tokens, one-time sign-in codes and tickets in addresses hidden. Off by default: /metrics counts "
        "requests, and the ingress or load balancer in front usually logs them.",
    )  # fmt: skip
    log_format: Literal["json", "text"] = Field(
        default="json", validation_alias=_aliases("CMBCLUSTER_LOG_FORMAT"),
        description="json: one JSON object per line on standard error, for a log collector; text: plain lines "
        "for reading in a terminal.",
    )  # fmt: skip

    namespace: str = Field(
        default="cmbcluster",
        pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
        validation_alias=_aliases("CMBCLUSTER_NAMESPACE"),
        description="The Kubernetes namespace of user environments.",
    )

    # -- sign-in -------------------------------------------------------------------------------
    session_ttl_hours: float = Field(
        default=12, gt=0, validation_alias=_aliases("CMBCLUSTER_SESSION_TTL_HOURS"),
        description="How long a sign-in session lasts (API clients may renew it with its refresh token). The "
        "server keeps sessions: signing out, or an admin deactivating the account, ends them at once.",
    )  # fmt: skip
    refresh_ttl_days: float = Field(
        default=30, gt=0, validation_alias=_aliases("CMBCLUSTER_REFRESH_TTL_DAYS"),
        description="How long after signing in with the identity provider an API client may exchange refresh "
        "tokens for new sessions: each exchange issues a new pair that continues the sign-in, never past this.",
    )  # fmt: skip
    login_attempts_per_minute: int = Field(
        default=30, ge=1, validation_alias=_aliases("CMBCLUSTER_LOGIN_ATTEMPTS_PER_MINUTE"),
        description="Sign-in attempts allowed per client address and minute.",
    )  # fmt: skip

    # -- environments ----------------------------------------------------------------------------
    max_environments_per_user: int = Field(
        default=3, ge=1, validation_alias=_aliases("CMBCLUSTER_MAX_ENVIRONMENTS_PER_USER"),
        description="Running (or starting) environments one user may have.",
    )  # fmt: skip
    max_concurrent_starts: int = Field(
        default=20, ge=1, validation_alias=_aliases("CMBCLUSTER_MAX_CONCURRENT_STARTS"),
        description="Environments starting at once across the whole server; more are answered 429.",
    )  # fmt: skip
    start_timeout_seconds: int = Field(
        default=600, ge=10, validation_alias=_aliases("CMBCLUSTER_START_TIMEOUT_SECONDS"),
        description="An environment not running this long after its start is stopped and marked failed; allow "
        "for pulling a large image onto a new node.",
    )  # fmt: skip
    idle_timeout_minutes: int = Field(
        default=120, ge=0, validation_alias=_aliases("CMBCLUSTER_IDLE_TIMEOUT_MINUTES"),
        description="Stop an environment without activity for this long; 0 never.",
    )  # fmt: skip
    max_uptime_hours: float = Field(
        default=24, ge=0, validation_alias=_aliases("CMBCLUSTER_MAX_UPTIME_HOURS"),
        description="Stop an environment after this long; 0 never. Admins can set it per user.",
    )  # fmt: skip
    max_extension_hours: float = Field(
        default=8, ge=0, validation_alias=_aliases("CMBCLUSTER_MAX_EXTENSION_HOURS"),
        description="How much longer than its maximum uptime a user may keep an environment running, an hour "
        "at a time, with Extend on the automatic-stop warning; 0: not at all.",
    )  # fmt: skip
    shutdown_warning_minutes: int = Field(
        default=15, ge=0, validation_alias=_aliases("CMBCLUSTER_SHUTDOWN_WARNING_MINUTES"),
        description="How long before an automatic stop the user is warned.",
    )  # fmt: skip
    reconcile_interval_seconds: float = Field(
        default=15, gt=0, validation_alias=_aliases("CMBCLUSTER_RECONCILE_INTERVAL_SECONDS"),
        description="How often the database and the compute backend are made to agree: what runs without a "
        "record is removed, vanished environments are marked stopped, idle or expired ones stopped.",
    )  # fmt: skip
    max_cpu: float = Field(
        default=8, gt=0, validation_alias=_aliases("CMBCLUSTER_MAX_CPU"),
        description="The most CPU cores one environment may ask for, as custom resources or a preset (larger "
        "presets are listed as unavailable). Keep it within what one node has.",
    )  # fmt: skip
    max_memory_mib: int = Field(
        default=32768, gt=0, validation_alias=_aliases("CMBCLUSTER_MAX_MEMORY_MIB"),
        description="The most memory (MiB) one environment may ask for, as custom resources or a preset.",
    )  # fmt: skip

    max_request_body_bytes: int = Field(
        default=1024 * 1024, gt=0, validation_alias=_aliases("CMBCLUSTER_MAX_REQUEST_BODY_BYTES"),
        description="Largest JSON request body; refused with 413 before it is read. Uploads have their own limit.",
    )  # fmt: skip
    request_timeout_seconds: float = Field(
        default=30, ge=1, le=3600, validation_alias=_aliases("CMBCLUSTER_REQUEST_TIMEOUT_SECONDS"),
        description="A request whose headers are not all in this long after its connection opened (or after "
        "the previous answer on it), or whose body (an upload's excepted) sends no byte for this long, is "
        "answered 408 and its connection closed: a client that stalls holds no connection for longer.",
    )  # fmt: skip

    # -- storage and user settings ---------------------------------------------------------------
    max_upload_bytes: int = Field(
        default=50 * 1024**3, gt=0, validation_alias=_aliases("CMBCLUSTER_MAX_UPLOAD_BYTES"),
        description="Largest object one upload may write.",
    )  # fmt: skip
    max_buckets_per_user: int = Field(
        default=10, ge=1, validation_alias=_aliases("CMBCLUSTER_MAX_BUCKETS_PER_USER"),
        description="Buckets one user may own; creating another is refused (409) until one is deleted.",
    )  # fmt: skip
    storage_quota_bytes: int = Field(
        default=0, ge=0, validation_alias=_aliases("CMBCLUSTER_STORAGE_QUOTA_BYTES"),
        description="Bytes each user's buckets may hold, current objects and earlier versions together; 0: no "
        "quota. Admins set a user's own.",
    )  # fmt: skip
    upload_idle_timeout_seconds: float = Field(
        default=300, gt=0, le=7 * 24 * 3600, validation_alias=_aliases("CMBCLUSTER_UPLOAD_IDLE_TIMEOUT_SECONDS"),
        description="An upload whose client sends no byte for this long is stopped (408) and stores nothing; "
        "the quota it held is free again. A hold its server stopped renewing for this long (and a quarter "
        "more) no longer counts against the quotas. At most a week.",
    )  # fmt: skip
    max_secret_file_bytes: int = Field(
        default=64 * 1024, gt=0, validation_alias=_aliases("CMBCLUSTER_MAX_SECRET_FILE_BYTES"),
        description="Largest secret file (a key, a credentials file) a user may store; larger ones are refused "
        "(413).",
    )  # fmt: skip

    # -- usage and budgets -----------------------------------------------------------------------
    prices: str | None = Field(
        default=None, validation_alias=_aliases("CMBCLUSTER_PRICES"),
        description="JSON: prices that replace the cloud plugin's list prices, e.g. "
        '{"vcpu_hour": 0.03, "gib_hour": 0.004, "storage_gb_month": {"standard": 0.02}, "cluster_hour": 0}.',
    )  # fmt: skip
    budget_webhook_url: str | None = Field(
        default=None, validation_alias=_aliases("CMBCLUSTER_BUDGET_WEBHOOK_URL"),
        description="Receives budget events (80 % reached, used up, starts refused) as JSON POSTs.",
    )  # fmt: skip
    metrics_token: SecretStr | None = Field(
        default=None, validation_alias=_aliases("CMBCLUSTER_METRICS_TOKEN"),
        description="The bearer token Prometheus sends to scrape /metrics (32 characters or more). /metrics "
        "names users and groups with their usage, so it answers only this token and administrators.",
    )  # fmt: skip
    usage_sample_minutes: float = Field(
        default=60, gt=0, validation_alias=_aliases("CMBCLUSTER_USAGE_SAMPLE_MINUTES"),
        description="How often each bucket's stored bytes are measured for usage reports.",
    )  # fmt: skip

    @field_validator(
        "auth_providers", "admin_emails", "plugins_allow", "plugins_block", "secret_key_previous", mode="before"
    )
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("prices")
    @classmethod
    def _price_table(cls, value: str | None) -> str | None:
        """Read as the server reads it, so that `config check` refuses what `serve` would."""
        from cmbcluster.errors import ConfigurationError
        from cmbcluster.pricing import PriceOverrides

        try:
            PriceOverrides.parse(value)
        except ConfigurationError as exc:
            raise ValueError("; ".join(exc.problems).removeprefix("CMBCLUSTER_PRICES ")) from None
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        """Parsed as the server parses it, so that a typo is one line naming the variable, not
        SQLAlchemy's traceback from whichever command opens the database first."""
        if not value:
            return None
        from cmbcluster.db.engine import check_database_url

        return check_database_url(value)

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _trusted_proxies(cls, value: str) -> str:
        """Addresses and networks only: uvicorn takes any other entry as a literal no client
        address ever equals (a typo, a host name, a network with host bits set), and then silently
        believes no proxy: every user signs in as the ingress's address, sharing one rate limit."""
        entries = [entry.strip() for entry in value.split(",") if entry.strip()]
        if entries == ["*"]:
            return "*"
        for entry in entries:
            if entry == "*":
                raise ValueError("* (any proxy) stands alone: list addresses and networks, or * only")
            try:
                ipaddress.ip_network(entry, strict=True) if "/" in entry else ipaddress.ip_address(entry)
            except ValueError:
                raise ValueError(_not_a_proxy_address(entry)) from None
        return ",".join(entries)

    @field_validator("budget_webhook_url")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        if value:
            from urllib.parse import urlsplit

            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"must be an absolute http(s) URL, not {value!r}")
        return value or None

    @field_validator("public_url")
    @classmethod
    def _absolute_url(cls, value: str | None) -> str | None:
        if value is not None:
            from urllib.parse import urlsplit

            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"must be an absolute http(s) URL such as https://cmb.example.org, not {value!r}")
            return value.rstrip("/")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("secret_key", "metrics_token")
    @classmethod
    def _strong_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            raw = value.get_secret_value()
            if len(raw) < 32 or raw.lower() in {"changeme", "secret", "change-me"}:
                raise ValueError("must be at least 32 random characters (generate one: openssl rand -hex 32)")
        return value

    # -- derived -------------------------------------------------------------------------------
    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'cmbcluster.db'}"

    @property
    def selected_storage(self) -> str:
        return self.storage_backend or self.cloud_provider

    @property
    def selected_auth(self) -> list[str]:
        return self.auth_providers or [self.cloud_provider]

    @property
    def selected_infra(self) -> str:
        return self.infra_provider or self.cloud_provider

    @property
    def selected_compute(self) -> str:
        if self.compute_backend:
            return self.compute_backend
        return "local" if self.cloud_provider == "local" else "kubernetes"

    @property
    def serves_loopback_only(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def env_var_name(model: type[BaseSettings], field_name: str) -> str:
    """The environment variable an operator sets for ``field_name`` of ``model``."""
    field = model.model_fields.get(field_name)
    if field is not None:
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            first = alias.choices[0]
            if isinstance(first, str):
                return first
        if isinstance(alias, str):
            return alias
        if field.alias:
            return field.alias
    prefix = str(model.model_config.get("env_prefix") or "")
    return f"{prefix}{field_name}".upper()


def env_var_names(model: type[BaseSettings]) -> tuple[frozenset[str], str]:
    """Every environment variable ``model`` reads, upper-case (each field's names and aliases, or its
    name under the model's ``env_prefix``), and that prefix ("" when none): what a test strips to start
    from a clean environment, and what ``config check`` knows as settings."""
    prefix = str(model.model_config.get("env_prefix") or "").upper()
    names: set[str] = set()
    for field_name, field in model.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(choice.upper() for choice in alias.choices if isinstance(choice, str))
        elif isinstance(alias, str):
            names.add(alias.upper())
        elif field.alias:
            names.add(field.alias.upper())
        else:
            names.add(f"{prefix}{field_name}".upper())
    return frozenset(names), prefix
