"""Sign-in with OpenID Connect: the public, stable base every OIDC-style auth plugin builds on.

A plugin for an issuer (Google, Cognito, Entra ID...) configures or subclasses
:class:`OidcProvider` instead of verifying tokens itself::

    from cmbcluster.oidc import OidcConfig, OidcProvider

    class EntraProvider(OidcProvider):
        def check_claims(self, claims):  # after every standard check passed
            ...

    EntraProvider(OidcConfig(
        name="azure", issuer=f"https://login.microsoftonline.com/{tenant}/v2.0", client_id=client_id,
        required_claims={"tid": (tenant,)}, email_claim="preferred_username",
        admin_roles=("CMBCluster.Admin",), require_verified_email=False,
    ))

What is stable (plugin API 1.x): the names in ``__all__`` and the members documented on them;
see ``docs/plugins/writing-a-plugin.md`` (sign-in). The classes are loaded on first use, so that
loading the built-in ``oidc`` plugin at start-up does not import httpx and joserfc.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cmbcluster.oidc.provider import ASYMMETRIC_ALGORITHMS, JwksCache, OidcConfig, OidcProvider, email_verified

__all__ = ["ASYMMETRIC_ALGORITHMS", "JwksCache", "OidcConfig", "OidcProvider", "email_verified"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("cmbcluster.oidc.provider"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
