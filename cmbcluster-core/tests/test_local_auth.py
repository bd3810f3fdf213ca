"""The development sign-in follows the code flow with PKCE and nonce, and rejects tampering."""

from __future__ import annotations

import base64
import json
import time

import pytest
from joserfc import jwt
from joserfc.jwk import OctKey

from cmbcluster.errors import AuthenticationFailed, InvalidRequest
from cmbcluster.interfaces import AuthorizationRequest
from cmbcluster.local.auth import DevLoginProvider
from cmbcluster.security import pkce_challenge

VERIFIER = "v" * 64


@pytest.fixture
def provider() -> DevLoginProvider:
    return DevLoginProvider(b"k" * 64)


def test_code_flow_with_pkce_and_nonce(provider: DevLoginProvider) -> None:
    url = provider.authorization_url(
        AuthorizationRequest(redirect_uri="http://127.0.0.1/cb", state="st", nonce="n1", code_challenge="cc")
    )
    assert url.startswith("/api/v1/auth/local/form?") and "state=st" in url and "code_challenge=cc" in url
    code = provider.issue_code(email="ada@example.org", name="Ada", nonce="n1", code_challenge=pkce_challenge(VERIFIER))
    tokens = provider.exchange_code(code, redirect_uri="http://127.0.0.1/cb", code_verifier=VERIFIER)
    assert tokens.id_token is not None
    claims = provider.validate_token(tokens.id_token, nonce="n1")
    user = provider.user_info(claims)
    assert (user.provider, user.email, user.name, user.email_verified) == ("local", "ada@example.org", "Ada", True)
    assert provider.exchange_token(tokens.id_token).email == "ada@example.org"


def test_wrong_verifier_nonce_or_token_type_is_rejected(provider: DevLoginProvider) -> None:
    code = provider.issue_code(email="ada@example.org", name="", nonce="n1", code_challenge=pkce_challenge(VERIFIER))
    with pytest.raises(AuthenticationFailed, match="PKCE"):
        provider.exchange_code(code, redirect_uri="x", code_verifier="w" * 64)
    id_token = provider.exchange_code(code, redirect_uri="x", code_verifier=VERIFIER).id_token
    assert id_token is not None
    with pytest.raises(AuthenticationFailed, match="nonce"):
        provider.validate_token(id_token, nonce="other")
    with pytest.raises(AuthenticationFailed, match="type"):
        provider.validate_token(code)  # a code is not an id token


def test_tokens_from_another_key_tampered_or_expired_are_rejected(provider: DevLoginProvider) -> None:
    other = DevLoginProvider(b"z" * 64)
    code = other.issue_code(email="eve@example.org", name="", nonce="n", code_challenge=pkce_challenge(VERIFIER))
    forged = other.exchange_code(code, redirect_uri="x", code_verifier=VERIFIER).id_token
    assert forged is not None
    with pytest.raises(AuthenticationFailed):
        provider.validate_token(forged)
    header, payload, _signature = forged.split(".")
    with pytest.raises(AuthenticationFailed):
        provider.validate_token(f"{header}.{payload}.")  # signature stripped
    other_key = jwt.encode({"alg": "HS256"}, {"typ": "id", "iss": "cmbcluster-local"}, OctKey.import_key(b"x" * 32))
    with pytest.raises(AuthenticationFailed):
        provider.validate_token(other_key)
    unsigned = ".".join(
        base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()
        for part in ({"alg": "none", "typ": "JWT"}, json.loads(base64.urlsafe_b64decode(payload + "==")))
    )
    with pytest.raises(AuthenticationFailed):
        provider.validate_token(unsigned + ".")
    now = int(time.time())
    expired = jwt.encode(
        {"alg": "HS256"},
        {"typ": "id", "iss": "cmbcluster-local", "aud": "cmbcluster", "sub": "a", "email": "a@x", "exp": now - 5},
        provider._key,
    )
    with pytest.raises(AuthenticationFailed, match="expired"):
        provider.validate_token(expired)


def test_login_form_needs_an_email(provider: DevLoginProvider) -> None:
    with pytest.raises(InvalidRequest):
        provider.issue_code(email="not-an-address", name="", nonce="n", code_challenge="c")
