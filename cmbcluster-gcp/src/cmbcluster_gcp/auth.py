"""Sign in with Google: core's OpenID Connect provider plus Google's own claim rules.

The code flow, PKCE, nonce, the algorithm allow-list, signature, issuer, audience and expiry
checks, and the cached JWKS (refetched on an unknown ``kid``) all come from
:class:`cmbcluster.oidc.OidcProvider`. Google adds:

- its ID tokens carry ``iss`` either as ``https://accounts.google.com`` or as
  ``accounts.google.com``: both are accepted;
- ``email_verified`` must be true (CMBCluster links accounts by e-mail);
- with ``GOOGLE_ALLOWED_DOMAINS`` set, the ``hd`` (Workspace hosted domain) claim must be one of
  them, so consumer accounts and other organisations are refused.

No ``access_type=offline`` and no ``prompt=consent``: CMBCluster keeps its own sessions and never
uses Google's refresh token, and ``prompt=consent`` would show the consent screen at every sign-in.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import httpx

from cmbcluster.errors import AuthenticationFailed
from cmbcluster.oidc import OidcConfig, OidcProvider, email_verified
from cmbcluster_gcp.settings import GcpSettings

GOOGLE_ISSUER = "https://accounts.google.com"
#: Google documents both forms of ``iss`` in its ID tokens.
GOOGLE_ISSUERS = (GOOGLE_ISSUER, "accounts.google.com")
GOOGLE_SCOPES = ("openid", "email", "profile")
#: Allowed clock skew when checking ``exp`` and ``iat``.
LEEWAY_SECONDS = 60


class GoogleProvider(OidcProvider):
    """Google accounts; ``allowed_domains`` restricts sign-in to Workspace domains (``hd``)."""

    def __init__(
        self, config: OidcConfig, *, allowed_domains: Iterable[str] = (), http: httpx.Client | None = None
    ) -> None:
        super().__init__(config, http=http)
        self.allowed_domains = tuple(d.strip().lower() for d in allowed_domains if d.strip())

    def check_claims(self, claims: dict[str, Any]) -> None:
        if not claims.get("email") or not email_verified(claims):
            raise AuthenticationFailed("the Google account's e-mail address is not verified")
        if self.allowed_domains:
            domain = claims.get("hd")
            if not isinstance(domain, str) or domain.lower() not in self.allowed_domains:
                raise AuthenticationFailed(
                    f"the Google account's hosted domain {domain!r} is not allowed to sign in here"
                )


def google_config(
    *,
    client_id: str,
    client_secret: str | None = None,
    issuer: str = GOOGLE_ISSUER,
    discovery_url: str | None = None,
    allowed_domains: tuple[str, ...] = (),
) -> OidcConfig:
    """The OIDC configuration for Google (or, in tests, for a mock standing in at ``issuer``)."""
    issuer = issuer.rstrip("/")
    accepted = GOOGLE_ISSUERS if issuer == GOOGLE_ISSUER else (issuer,)
    # A single allowed domain is passed as the ``hd`` hint so Google's account chooser offers only
    # that domain's accounts. A hint only: check_claims still verifies the claim.
    extra = {"hd": allowed_domains[0]} if len(allowed_domains) == 1 else {}
    return OidcConfig(
        name="gcp",
        issuer=issuer,
        client_id=client_id,
        client_secret=client_secret,
        display_name="Google",
        scopes=GOOGLE_SCOPES,
        discovery_url=discovery_url,
        accepted_issuers=accepted,
        audience=client_id,
        algorithms=("RS256",),
        leeway_seconds=LEEWAY_SECONDS,
        admin_groups=(),  # Google ID tokens carry no groups; admins come from CMBCLUSTER_ADMIN_EMAILS
        extra_authorize_params=extra,
    )


def google_provider(settings: GcpSettings, *, http: httpx.Client | None = None) -> GoogleProvider:
    """A :class:`GoogleProvider` from the plugin's settings (GOOGLE_CLIENT_ID must be set)."""
    if not settings.google_client_id:
        raise ValueError("GOOGLE_CLIENT_ID is not set")
    domains = settings.google_allowed_domain_list
    secret = settings.google_client_secret
    config = google_config(
        client_id=settings.google_client_id,
        client_secret=secret.get_secret_value() if secret else None,
        issuer=settings.google_issuer,
        discovery_url=settings.google_discovery_url,
        allowed_domains=domains,
    )
    return GoogleProvider(config, allowed_domains=domains, http=http)
