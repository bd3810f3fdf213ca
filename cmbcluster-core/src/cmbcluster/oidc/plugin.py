"""The built-in ``oidc`` auth provider: any OpenID Connect issuer, configured by settings."""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cmbcluster.hookspecs import hookimpl
from cmbcluster.interfaces import AuthProvider
from cmbcluster.registrations import AuthProviderRegistration, ProviderContext


class OidcSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    oidc_issuer: str = Field(
        validation_alias=AliasChoices("CMBCLUSTER_OIDC_ISSUER"),
        description="The issuer's URL (https://...), exactly as its tokens' iss claim names it.",
    )
    oidc_client_id: str = Field(
        validation_alias=AliasChoices("CMBCLUSTER_OIDC_CLIENT_ID"),
        description="The client id registered with the issuer, with <public URL>/api/v1/auth/oidc/callback as "
        "its redirect URI.",
    )
    oidc_client_secret: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("CMBCLUSTER_OIDC_CLIENT_SECRET"),
        description="The client's secret (sent as HTTP basic auth); unset for a public client, which PKCE alone "
        "protects.",
    )
    oidc_scopes: str = Field(
        default="openid email profile",
        validation_alias=AliasChoices("CMBCLUSTER_OIDC_SCOPES"),
        description="Space-separated scopes asked for at sign-in: enough for the ID token to carry the e-mail "
        "address, without which sign-in is refused.",
    )
    oidc_display_name: str = Field(
        default="Single sign-on",
        validation_alias=AliasChoices("CMBCLUSTER_OIDC_DISPLAY_NAME"),
        description="The sign-in page's button reads 'Sign in with <this>'.",
    )
    oidc_discovery_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("CMBCLUSTER_OIDC_DISCOVERY_URL"),
        description="Default: <issuer>/.well-known/openid-configuration; set it for an issuer whose discovery "
        "document is elsewhere.",
    )
    oidc_admin_groups: str = Field(
        default="admin,admins,cmbcluster-admins",
        validation_alias=AliasChoices("CMBCLUSTER_OIDC_ADMIN_GROUPS"),
        description="Comma-separated groups (in CMBCLUSTER_OIDC_GROUPS_CLAIM) whose members are made "
        "administrators when they sign in; someone who left them is a plain user again from their next sign-in.",
    )
    oidc_require_verified_email: bool = Field(
        default=True,
        validation_alias=AliasChoices("CMBCLUSTER_OIDC_REQUIRE_VERIFIED_EMAIL"),
        description="Refuse sign-in unless the token says email_verified=true. Set false only for an issuer "
        "that never sends the claim: its addresses then grant nothing (no admin, no account linking).",
    )
    oidc_email_claim: str = Field(
        default="email",
        validation_alias=AliasChoices("CMBCLUSTER_OIDC_EMAIL_CLAIM"),
        description="The ID-token claim holding the user's e-mail address.",
    )
    oidc_email_verified_claim: str = Field(
        default="email_verified",
        validation_alias=AliasChoices("CMBCLUSTER_OIDC_EMAIL_VERIFIED_CLAIM"),
        description='The claim in which the issuer vouches for that address (true, or "true"); Entra ID: '
        "xms_edov. Empty: the issuer never vouches (then CMBCLUSTER_OIDC_REQUIRE_VERIFIED_EMAIL must be false).",
    )
    oidc_groups_claim: str = Field(
        default="groups",
        validation_alias=AliasChoices("CMBCLUSTER_OIDC_GROUPS_CLAIM"),
        description="The claim listing the user's groups, matched against CMBCLUSTER_OIDC_ADMIN_GROUPS.",
    )

    @model_validator(mode="after")
    def _vouching_needs_a_claim(self) -> OidcSettings:
        # An empty value (a blank line in .env, an unset Helm value) is a missing one, said here
        # rather than as a failed discovery at the first sign-in.
        if not self.oidc_client_id.strip():
            raise ValueError("CMBCLUSTER_OIDC_CLIENT_ID is empty: set the client id registered with the issuer")
        if not self.oidc_issuer.strip().lower().startswith(("https://", "http://")):
            raise ValueError(f"CMBCLUSTER_OIDC_ISSUER must be the issuer's URL (https://...), not {self.oidc_issuer!r}")
        if self.oidc_require_verified_email and not self.oidc_email_verified_claim.strip():
            raise ValueError(
                "CMBCLUSTER_OIDC_EMAIL_VERIFIED_CLAIM is empty (the issuer never vouches for addresses) while "
                "CMBCLUSTER_OIDC_REQUIRE_VERIFIED_EMAIL is true: nobody could sign in; set "
                "CMBCLUSTER_OIDC_REQUIRE_VERIFIED_EMAIL=false (addresses then grant nothing) or name the claim"
            )
        return self


def _provider(ctx: ProviderContext) -> AuthProvider:
    from cmbcluster.oidc import OidcConfig, OidcProvider

    s = ctx.require_settings(OidcSettings)
    return OidcProvider(
        OidcConfig(
            name="oidc",
            issuer=s.oidc_issuer,
            client_id=s.oidc_client_id,
            client_secret=s.oidc_client_secret.get_secret_value() if s.oidc_client_secret else None,
            display_name=s.oidc_display_name,
            scopes=tuple(s.oidc_scopes.split()),
            discovery_url=s.oidc_discovery_url,
            admin_groups=tuple(g.strip() for g in s.oidc_admin_groups.split(",") if g.strip()),
            require_verified_email=s.oidc_require_verified_email,
            email_claim=s.oidc_email_claim,
            email_verified_claim=s.oidc_email_verified_claim.strip() or None,
            groups_claim=s.oidc_groups_claim,
        )
    )


@hookimpl
def cmbcluster_auth_providers() -> Iterator[AuthProviderRegistration]:
    yield AuthProviderRegistration(
        name="oidc", factory=_provider, settings_model=OidcSettings, description="Any OpenID Connect issuer"
    )
