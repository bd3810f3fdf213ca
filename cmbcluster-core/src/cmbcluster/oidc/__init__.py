"""OpenID Connect in core: a generic provider that Google- and Cognito-style plugins build on."""

from cmbcluster.oidc.provider import JwksCache, OidcConfig, OidcProvider

__all__ = ["JwksCache", "OidcConfig", "OidcProvider"]
