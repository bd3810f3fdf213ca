"""The development sign-in: anyone who can reach the server picks an e-mail address.

It refuses to serve beyond loopback unless CMBCLUSTER_DEV_LOGIN_ALLOW_REMOTE is set (checked by
``cmbcluster config check``). It still follows the code flow with PKCE and nonce, so the
control plane runs one sign-in path for every provider.
"""

from __future__ import annotations

import functools
import hashlib
import time
from typing import Any
from urllib.parse import urlencode

from cmbcluster.errors import AuthenticationFailed
from cmbcluster.interfaces import AuthorizationRequest, AuthProvider, TokenSet, UserInfo
from cmbcluster.security import pkce_challenge
from cmbcluster.text import check_email_address

ISSUER = "cmbcluster-local"
CODE_TTL = 120
TOKEN_TTL = 300
FORM_PATH = "/api/v1/auth/local/form"


class DevLoginProvider(AuthProvider):
    display_name = "Development sign-in"

    def __init__(self, key: bytes, *, audience: str = "cmbcluster", vouches_for_addresses: bool = True) -> None:
        self._secret = hashlib.sha256(b"dev-login:" + key).digest()
        self.audience = audience
        #: Nobody checks the address typed in: alone (the embedded default) it is the only way in,
        #: beside a real identity provider it must never link to, or make an admin of, its accounts.
        self.vouches_for_addresses = vouches_for_addresses

    @functools.cached_property
    def _key(self) -> Any:
        from joserfc.jwk import OctKey  # imported on first sign-in, not at start-up

        return OctKey.import_key(self._secret)

    def authorization_url(self, request: AuthorizationRequest) -> str:
        query = urlencode(
            {
                "redirect_uri": request.redirect_uri,
                "state": request.state,
                "nonce": request.nonce,
                "code_challenge": request.code_challenge,
                "code_challenge_method": request.code_challenge_method,
            }
        )
        return f"{FORM_PATH}?{query}"

    def issue_code(self, *, email: str, name: str, nonce: str, code_challenge: str) -> str:
        """What the login form returns to the callback after the person typed an address;
        InvalidRequest, saying why, for text that is no address (checked here, at the form, not
        only when the callback signs the person in)."""
        check_email_address(email)
        now = int(time.time())
        claims = {
            "typ": "code", "email": email, "name": name, "nonce": nonce, "cc": code_challenge,
            "iss": ISSUER, "iat": now, "exp": now + CODE_TTL,
        }  # fmt: skip
        from joserfc import jwt

        return jwt.encode({"alg": "HS256"}, claims, self._key)

    def exchange_code(self, code: str, *, redirect_uri: str, code_verifier: str) -> TokenSet:
        claims = self._decode(code, expected_type="code")
        if pkce_challenge(code_verifier) != claims.get("cc"):
            raise AuthenticationFailed("PKCE verification failed")
        now = int(time.time())
        id_claims = {
            "typ": "id", "sub": claims["email"], "email": claims["email"],
            "email_verified": self.vouches_for_addresses,
            "name": claims.get("name", ""), "nonce": claims.get("nonce"), "iss": ISSUER, "aud": self.audience,
            "iat": now, "exp": now + TOKEN_TTL,
        }  # fmt: skip
        from joserfc import jwt

        return TokenSet(id_token=jwt.encode({"alg": "HS256"}, id_claims, self._key), expires_in=TOKEN_TTL)

    def validate_token(self, token: str, *, nonce: str | None = None) -> dict[str, Any]:
        claims = self._decode(token, expected_type="id")
        if claims.get("aud") != self.audience:
            raise AuthenticationFailed("token audience mismatch")
        if nonce is not None and claims.get("nonce") != nonce:
            raise AuthenticationFailed("nonce mismatch")
        return claims

    def user_info(self, claims: dict[str, Any]) -> UserInfo:
        return UserInfo(
            provider="local",
            subject=str(claims["sub"]),
            email=str(claims["email"]),
            email_verified=self.vouches_for_addresses,
            name=str(claims.get("name", "")),
            claims=claims,
        )

    def _decode(self, token: str, *, expected_type: str) -> dict[str, Any]:
        from joserfc import jwt
        from joserfc.errors import JoseError

        try:
            decoded = jwt.decode(token, self._key, algorithms=["HS256"])
        except (JoseError, ValueError) as exc:
            raise AuthenticationFailed(f"invalid token: {exc}") from None
        claims = dict(decoded.claims)
        if claims.get("typ") != expected_type or claims.get("iss") != ISSUER:
            raise AuthenticationFailed("invalid token type or issuer")
        if int(claims.get("exp", 0)) < time.time():
            raise AuthenticationFailed("token expired")
        return claims
