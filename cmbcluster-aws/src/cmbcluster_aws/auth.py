"""Amazon Cognito user pools as an identity provider.

Cognito is an OpenID Connect issuer with its own rules, added here on top of core's generic
:class:`~cmbcluster.oidc.provider.OidcProvider` (which already enforces the algorithm
allow-list, issuer, expiry with a small skew, nonce, and the JWKS cache refreshed on an unknown
``kid``):

- the issuer is ``https://cognito-idp.<the pool's region>.amazonaws.com/<pool id>`` and the keys are at
  ``<issuer>/.well-known/jwks.json`` (both overridable: ``COGNITO_ISSUER``, ``COGNITO_JWKS_URL``);
- only RS256 is accepted (Cognito signs with nothing else);
- ``token_use`` must be ``id`` (then ``aud`` is our app client): access tokens carry no verified
  e-mail address and are not meant for the client, so they are refused on every path;
- an address signs in whether or not Cognito has verified it, but only a verified one
  (``email_verified``) grants admin or links to an existing account;
- groups come from ``cognito:groups`` and map to roles (``admins`` -> ``admin``);
- the browser flow uses the hosted UI domain (``COGNITO_DOMAIN``):
  ``https://<domain>/oauth2/authorize`` and ``/oauth2/token``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import httpx

from cmbcluster.errors import AuthenticationFailed
from cmbcluster.interfaces import UserInfo
from cmbcluster.oidc.provider import OidcConfig, OidcProvider
from cmbcluster_aws.settings import AwsSettings

GROUPS_CLAIM = "cognito:groups"
DEFAULT_ADMIN_GROUPS = ("admin", "admins", "cmbcluster-admins")


def cognito_issuer(region: str, user_pool_id: str) -> str:
    return f"https://cognito-idp.{region}.amazonaws.com/{user_pool_id}"


def hosted_ui_base(domain: str) -> str:
    """``https://<domain>`` for a bare domain (``myapp.auth.eu-west-1.amazoncognito.com`` or a
    custom one); a value that already has a scheme is kept as given."""
    domain = domain.strip().rstrip("/")
    if domain.startswith(("https://", "http://")):
        return domain
    return f"https://{domain}"


class CognitoProvider(OidcProvider):
    """Sign-in with a Cognito user pool's app client."""

    def __init__(
        self,
        config: OidcConfig,
        *,
        domain: str | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        if tuple(config.algorithms) != ("RS256",):
            raise ValueError("Cognito signs its tokens with RS256 only")
        super().__init__(config, http=http)
        self.domain = hosted_ui_base(domain) if domain else None

    @classmethod
    def from_settings(
        cls,
        settings: AwsSettings,
        *,
        name: str = "aws",
        display_name: str = "Cognito",
        http: httpx.Client | None = None,
    ) -> CognitoProvider:
        if not settings.cognito_user_pool_id or not settings.cognito_client_id:
            raise ValueError("COGNITO_USER_POOL_ID and COGNITO_CLIENT_ID are required")
        issuer = (
            settings.cognito_issuer or cognito_issuer(settings.cognito_region, settings.cognito_user_pool_id)
        ).rstrip("/")
        secret = settings.cognito_client_secret.get_secret_value() if settings.cognito_client_secret else None
        config = OidcConfig(
            name=name,
            issuer=issuer,
            client_id=settings.cognito_client_id,
            client_secret=secret or None,
            display_name=display_name,
            scopes=("openid", "email", "profile"),
            jwks_url=settings.cognito_jwks_url or f"{issuer}/.well-known/jwks.json",
            algorithms=("RS256",),
            groups_claim=GROUPS_CLAIM,
            admin_groups=DEFAULT_ADMIN_GROUPS,
            # Pools often hold addresses an administrator typed in: they may sign in, but
            # core's sign-in grants nothing from an unverified address.
            require_verified_email=False,
        )
        return cls(config, domain=settings.cognito_domain, http=http)

    # -- endpoints -------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """With a hosted UI domain the endpoints are known, so nothing is fetched (moto has no
        hosted UI); without one, Cognito's discovery document at the issuer is used."""
        if self.domain is None:
            return super().metadata()
        return {
            "issuer": self.config.issuer,
            "authorization_endpoint": f"{self.domain}/oauth2/authorize",
            "token_endpoint": f"{self.domain}/oauth2/token",
            "userinfo_endpoint": f"{self.domain}/oauth2/userInfo",
            "jwks_uri": self._jwks_url(),
        }

    def _jwks_url(self) -> str:
        if self.config.jwks_url:
            return self.config.jwks_url
        return self.config.issuer.rstrip("/") + "/.well-known/jwks.json"

    def check_ready(self) -> None:
        """The pool's keys are what validation needs: fetch them (ProviderUnavailable otherwise)."""
        self.jwks.refresh()
        if self.domain is None:
            super().check_ready()

    # -- validation --------------------------------------------------------------------------------
    def check_audience(self, claims: dict[str, Any]) -> None:
        """Only ID tokens (``token_use`` ``id``, our app client in ``aud``) sign anyone in."""
        use = claims.get("token_use")
        if use != "id":
            raise AuthenticationFailed(f"token_use {use!r} is not accepted: send the Cognito ID token")
        super().check_audience(claims)

    def check_claims(self, claims: dict[str, Any]) -> None:
        groups = claims.get(GROUPS_CLAIM)
        if groups is not None and not (isinstance(groups, list) and all(isinstance(g, str) for g in groups)):
            raise AuthenticationFailed(f"token claim {GROUPS_CLAIM} is not a list of group names")

    def user_info(self, claims: dict[str, Any]) -> UserInfo:
        info = super().user_info(claims)
        if info.name:
            return info
        # Cognito ID tokens name the user by ``cognito:username``; pools that sign in by e-mail
        # put the subject or the address there: no name then.
        username = str(claims.get("cognito:username") or "")
        if not username or username in (info.subject, info.email):
            return info
        return replace(info, name=username)
