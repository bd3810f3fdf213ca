"""The auth interface: an identity provider that users sign in with.

The control plane runs the OpenID Connect authorization-code flow (state, nonce and PKCE are
generated and checked by core); a provider supplies the provider-specific steps. Sessions are
CMBCluster's own, not the identity provider's tokens.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

from cmbcluster.errors import AuthenticationFailed


@dataclass(frozen=True, kw_only=True)
class TokenSet:
    """What a code exchange or refresh returns."""

    id_token: str | None = None
    access_token: str | None = None
    refresh_token: str | None = None
    expires_in: int | None = None


@dataclass(frozen=True, kw_only=True)
class UserInfo:
    """A signed-in person, normalised across providers.

    ``subject`` is unique per provider; ``groups`` are the provider's groups and ``roles`` the
    CMBCluster roles they map to (for example Cognito group ``admins`` -> ``admin``).
    """

    provider: str
    subject: str
    email: str
    email_verified: bool = False
    name: str = ""
    picture: str = ""
    groups: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    claims: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True, kw_only=True)
class AuthorizationRequest:
    """What core generated for one sign-in attempt; the provider builds its URL from it."""

    redirect_uri: str
    state: str
    nonce: str
    code_challenge: str
    code_challenge_method: str = "S256"


class AuthProvider(abc.ABC):
    """One identity provider (Google, Cognito, a generic OIDC issuer, the development login)."""

    #: Shown on the sign-in page.
    display_name: str = ""

    @abc.abstractmethod
    def authorization_url(self, request: AuthorizationRequest) -> str:
        """Where to send the browser to sign in."""

    @abc.abstractmethod
    def exchange_code(self, code: str, *, redirect_uri: str, code_verifier: str) -> TokenSet:
        """Trade an authorization code for tokens. Failure: AuthenticationFailed."""

    @abc.abstractmethod
    def validate_token(self, token: str, *, nonce: str | None = None) -> dict[str, Any]:
        """Verify a token's signature, algorithm, issuer, audience and expiry; return its claims.

        Any failure raises :class:`~cmbcluster.errors.AuthenticationFailed`.
        """

    @abc.abstractmethod
    def user_info(self, claims: dict[str, Any]) -> UserInfo:
        """Normalise validated claims into a :class:`UserInfo`."""

    def exchange_token(self, token: str) -> UserInfo:
        """Turn an identity-provider token sent by an API client into a user (no nonce)."""
        return self.user_info(self.validate_token(token))

    def refresh(self, refresh_token: str) -> TokenSet:
        """Refresh tokens; providers without refresh raise AuthenticationFailed."""
        raise AuthenticationFailed(f"{type(self).__name__} cannot refresh tokens")

    def check_ready(self) -> None:  # noqa: B027 - optional hook with a sensible default
        """Raise ProviderUnavailable if the identity provider is unreachable."""

    def close(self) -> None:  # noqa: B027 - optional hook with a sensible default
        """Release connections (an HTTP client it made). Called once when the control plane stops."""
