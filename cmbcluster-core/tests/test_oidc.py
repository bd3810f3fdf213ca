"""The generic OpenID Connect provider: token validation against real HTTP key servers, and the
whole browser sign-in flow against a real OIDC provider (oidc-provider-mock)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient

from cmbcluster.app import create_app
from cmbcluster.errors import AuthenticationFailed, ProviderUnavailable
from cmbcluster.interfaces import AuthorizationRequest
from cmbcluster.oidc import OidcConfig, OidcProvider
from cmbcluster.settings import CoreSettings
from cmbcluster.testing.api import LOCAL
from cmbcluster.testing.auth import AuthProviderContract
from cmbcluster.testing.oidc import KeyServer, OidcMockServer

CLIENT_ID = "cmbcluster-test"


@pytest.fixture
def keys() -> Iterator[KeyServer]:
    with KeyServer(kids=("key-1", "key-2", "key-3")) as server:
        server.published = {"key-1"}
        yield server


@pytest.fixture
def provider(keys: KeyServer) -> OidcProvider:
    return OidcProvider(OidcConfig(name="oidc", issuer=keys.issuer, client_id=CLIENT_ID, leeway_seconds=30))


def claims(**extra: object) -> dict[str, object]:
    return {"sub": "u-1", "aud": CLIENT_ID, "email": "grace@example.org", "email_verified": True, **extra}


def test_valid_token_is_accepted_and_normalised(provider: OidcProvider, keys: KeyServer) -> None:
    token = keys.sign(claims(nonce="n-1", name="Grace Hopper", groups=["admins", "physics"]))
    validated = provider.validate_token(token, nonce="n-1")
    user = provider.user_info(validated)
    assert (user.subject, user.email, user.email_verified, user.name) == (
        "u-1",
        "grace@example.org",
        True,
        "Grace Hopper",
    )
    assert user.groups == ("admins", "physics") and user.roles == ("admin",)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"aud": "someone-else"}, "audience"),
        ({"iss": "https://evil.example"}, "issuer"),
        ({"exp": int(time.time()) - 120}, "expired"),
        ({"iat": int(time.time()) + 3600, "exp": int(time.time()) + 7200}, "future"),
    ],
)
def test_tokens_with_bad_claims_are_rejected(
    provider: OidcProvider, keys: KeyServer, change: dict[str, object], message: str
) -> None:
    with pytest.raises(AuthenticationFailed, match=message):
        provider.validate_token(keys.sign(claims(**change)))


def test_expiry_allows_a_small_clock_skew(provider: OidcProvider, keys: KeyServer) -> None:
    assert provider.validate_token(keys.sign(claims(exp=int(time.time()) - 10)))


def test_nonce_must_match(provider: OidcProvider, keys: KeyServer) -> None:
    with pytest.raises(AuthenticationFailed, match="nonce"):
        provider.validate_token(keys.sign(claims(nonce="n-1")), nonce="n-2")


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_alg_none_and_hmac_with_the_public_key_are_rejected(provider: OidcProvider, keys: KeyServer) -> None:
    full = {"iss": keys.issuer, "exp": int(time.time()) + 300, **claims()}
    unsigned = f"{_b64({'alg': 'none', 'kid': 'key-1'})}.{_b64(full)}."
    with pytest.raises(AuthenticationFailed, match="algorithm"):
        provider.validate_token(unsigned)
    # the classic confusion attack: HMAC "signed" with the RSA public key (built by hand: JOSE
    # libraries refuse to make such a key)
    public_pem = keys.keys["key-1"].as_pem(private=False)
    signing_input = f"{_b64({'alg': 'HS256', 'kid': 'key-1'})}.{_b64(full)}"
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    forged = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    with pytest.raises(AuthenticationFailed, match="algorithm"):
        provider.validate_token(forged)
    signature_swapped = keys.sign(claims()).rsplit(".", 1)[0] + "." + keys.sign(claims(sub="other")).rsplit(".", 1)[1]
    with pytest.raises(AuthenticationFailed, match="signature"):
        provider.validate_token(signature_swapped)
    with pytest.raises(AuthenticationFailed, match="malformed"):
        provider.validate_token("not-a-token")


def test_unknown_kid_refreshes_the_jwks_once(provider: OidcProvider, keys: KeyServer) -> None:
    provider.validate_token(keys.sign(claims()))
    assert keys.jwks_requests == 1
    provider.validate_token(keys.sign(claims()))
    assert keys.jwks_requests == 1  # cached
    provider.jwks._min_refresh = 0  # the test does not wait out the refresh floor
    keys.published = {"key-1", "key-2"}  # the provider rotates keys
    assert provider.validate_token(keys.sign(claims(), kid="key-2"))
    assert keys.jwks_requests == 2
    with pytest.raises(AuthenticationFailed, match="unknown key"):
        provider.validate_token(keys.sign(claims(), kid="key-3"))  # never published
    assert keys.jwks_requests == 3  # looked once more, then gave up


def test_forged_kids_cannot_hammer_the_provider(provider: OidcProvider, keys: KeyServer) -> None:
    provider.validate_token(keys.sign(claims()))
    for _ in range(5):
        with pytest.raises(AuthenticationFailed):
            provider.validate_token(keys.sign(claims(), kid="key-2"))  # not published
    assert keys.jwks_requests == 1  # refreshes are rate limited


def test_token_without_kid_uses_the_single_key(provider: OidcProvider, keys: KeyServer) -> None:
    assert provider.validate_token(keys.sign(claims(), kid=None))["sub"] == "u-1"


def test_unreachable_provider_is_unavailable_not_unauthenticated() -> None:
    provider = OidcProvider(
        OidcConfig(name="oidc", issuer="http://127.0.0.1:9", client_id=CLIENT_ID, timeout_seconds=1)
    )
    with pytest.raises(ProviderUnavailable):
        provider.check_ready()


def test_symmetric_algorithms_cannot_be_configured() -> None:
    with pytest.raises(ValueError, match="asymmetric"):
        OidcConfig(name="x", issuer="https://x", client_id="c", algorithms=("HS256",))


# -- the whole flow against a real OpenID Connect provider --------------------------------------
@pytest.fixture(scope="module")
def oidc_server() -> Iterator[OidcMockServer]:
    with OidcMockServer() as server:
        yield server


@pytest.fixture
def oidc_client(
    settings: CoreSettings, oidc_server: OidcMockServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    monkeypatch.setenv("CMBCLUSTER_OIDC_ISSUER", oidc_server.issuer)
    monkeypatch.setenv("CMBCLUSTER_OIDC_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("CMBCLUSTER_OIDC_CLIENT_SECRET", "client-secret")
    monkeypatch.setenv("CMBCLUSTER_OIDC_DISPLAY_NAME", "University login")
    app = create_app(settings.model_copy(update={"auth_providers": ["oidc", "local"]}))
    with TestClient(app, base_url=LOCAL) as client:
        yield client


def sign_in_with_oidc(client: TestClient, server: OidcMockServer, sub: str) -> None:
    start = client.get("/api/v1/auth/oidc/login", params={"next": "/storage"}, follow_redirects=False)
    assert start.status_code == 303
    authorize_url = start.headers["location"]
    assert authorize_url.startswith(server.issuer)
    query = dict(p.split("=", 1) for p in urlsplit(authorize_url).query.split("&"))
    assert query["code_challenge_method"] == "S256" and query["nonce"] and query["state"]
    callback = urlsplit(server.authorize(authorize_url, sub))
    done = client.get(f"{callback.path}?{callback.query}", follow_redirects=False)
    assert done.status_code == 303, done.text
    assert done.headers["location"] == "/storage"


def test_sign_in_through_a_real_oidc_provider(oidc_client: TestClient, oidc_server: OidcMockServer) -> None:
    providers = oidc_client.get("/api/v1/auth/providers").json()["providers"]
    assert [(p["name"], p["display_name"], p["kind"]) for p in providers] == [
        ("oidc", "University login", "oidc"),
        ("local", "Development sign-in", "development"),
    ]
    oidc_server.put_user("grace", {"email": "grace@example.org", "email_verified": True, "name": "Grace Hopper"})
    sign_in_with_oidc(oidc_client, oidc_server, "grace")
    me = oidc_client.get("/api/v1/auth/me").json()
    assert (me["email"], me["name"], me["role"]) == ("grace@example.org", "Grace Hopper", "admin")
    assert oidc_client.get("/readyz").json()["checks"]["auth:oidc"] == "ok"


def test_oidc_groups_make_admins(oidc_client: TestClient, oidc_server: OidcMockServer) -> None:
    oidc_server.put_user("first", {"email": "first@example.org", "email_verified": True})
    sign_in_with_oidc(oidc_client, oidc_server, "first")
    oidc_client.cookies.clear()
    oidc_server.put_user("lin", {"email": "lin@example.org", "email_verified": True, "groups": ["cmbcluster-admins"]})
    sign_in_with_oidc(oidc_client, oidc_server, "lin")
    assert oidc_client.get("/api/v1/auth/me").json()["role"] == "admin"


def test_replayed_callback_is_refused(oidc_client: TestClient, oidc_server: OidcMockServer) -> None:
    oidc_server.put_user("ann", {"email": "ann@example.org", "email_verified": True})
    start = oidc_client.get("/api/v1/auth/oidc/login", follow_redirects=False)
    callback = urlsplit(oidc_server.authorize(start.headers["location"], "ann"))
    assert oidc_client.get(f"{callback.path}?{callback.query}", follow_redirects=False).status_code == 303
    replay = oidc_client.get(f"{callback.path}?{callback.query}", follow_redirects=False)
    assert replay.status_code == 401  # the sign-in state was consumed with the first use


# -- the token-verification contract (cmbcluster.testing.auth) ------------------------------------
class TestGenericOidcTokenContract(AuthProviderContract):
    @pytest.fixture
    def auth_provider(self, key_server: KeyServer, client_id: str) -> OidcProvider:
        return OidcProvider(OidcConfig(name="oidc", issuer=key_server.issuer, client_id=client_id))


class TestGenericOidcWithoutVerifiedEmailsTokenContract(AuthProviderContract):
    """The opt-out for issuers that never send email_verified: sign-in works, the address grants nothing."""

    @pytest.fixture
    def auth_provider(self, key_server: KeyServer, client_id: str) -> OidcProvider:
        config = OidcConfig(name="oidc", issuer=key_server.issuer, client_id=client_id, require_verified_email=False)
        return OidcProvider(config)


# -- the public base a third-party sign-in builds on (cmbcluster.oidc), against the real provider ---------
class TenantProvider(OidcProvider):
    """What an Entra ID plugin writes: configuration for the claims, one extra check of its own."""

    def check_claims(self, claims: dict[str, Any]) -> None:
        if claims.get("ver") == "1.0":
            raise AuthenticationFailed("v1.0 tokens are not accepted: use the v2.0 endpoint")


def tenant_provider(issuer: str) -> TenantProvider:
    return TenantProvider(
        OidcConfig(
            name="azure", issuer=issuer, client_id=CLIENT_ID, client_secret="client-secret",
            required_claims={"tid": ("tenant-a",)}, email_claim="preferred_username", email_verified_claim=None,
            admin_roles=("CMBCluster.Admin",), require_verified_email=False,
        )
    )  # fmt: skip


def sign_in_directly(provider: OidcProvider, server: OidcMockServer, sub: str) -> dict[str, Any]:
    """The code flow with PKCE and a nonce, as core runs it: what the provider validated."""
    verifier = "v" * 64
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    redirect_uri = "http://127.0.0.1/api/v1/auth/azure/callback"
    request = AuthorizationRequest(redirect_uri=redirect_uri, state="s-1", nonce="n-1", code_challenge=challenge)
    callback = parse_qs(urlsplit(server.authorize(provider.authorization_url(request), sub)).query)
    tokens = provider.exchange_code(callback["code"][0], redirect_uri=redirect_uri, code_verifier=verifier)
    assert tokens.id_token
    return provider.validate_token(tokens.id_token, nonce="n-1")


def test_a_plugin_configures_claims_mapping_extra_claims_and_admin_roles(oidc_server: OidcMockServer) -> None:
    provider = tenant_provider(oidc_server.issuer)
    kim = {"tid": "tenant-a", "preferred_username": "kim@uni.example", "name": "Kim", "roles": ["CMBCluster.Admin"]}
    oidc_server.put_user("kim", kim)
    user = provider.user_info(sign_in_directly(provider, oidc_server, "kim"))
    assert (user.provider, user.email, user.email_verified) == ("azure", "kim@uni.example", False)
    assert user.roles == ("admin",)
    oidc_server.put_user("lee", {"tid": "tenant-a", "preferred_username": "lee@uni.example", "roles": ["Reader"]})
    assert provider.user_info(sign_in_directly(provider, oidc_server, "lee")).roles == ()


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"tid": "tenant-b"}, "claim 'tid' is not one this deployment accepts"),
        ({}, "claim 'tid' is not one this deployment accepts"),  # a missing claim is refused, not skipped
        ({"tid": "tenant-a", "ver": "1.0"}, "v1.0 tokens are not accepted"),  # the subclass's own check runs
    ],
)
def test_a_plugin_extra_claim_checks_refuse_other_tenants(
    oidc_server: OidcMockServer, claims: dict[str, object], message: str
) -> None:
    provider = tenant_provider(oidc_server.issuer)
    oidc_server.put_user("mallory", {"preferred_username": "mallory@other.example", **claims})
    with pytest.raises(AuthenticationFailed, match=message):
        sign_in_directly(provider, oidc_server, "mallory")


def test_required_claims_need_a_tuple_of_values() -> None:
    with pytest.raises(ValueError, match="tuple of accepted values for tid"):
        OidcConfig(name="x", issuer="https://x", client_id="c", required_claims={"tid": "tenant-a"})  # type: ignore[dict-item]


class TestEntraStyleTokenContract(AuthProviderContract):
    """An Entra ID plugin configured as docs/plugins/writing-a-plugin.md does, tested as
    docs/plugins/testing.md does: the address in ``email``, vouched for by the optional claim
    ``xms_edov`` only; a tenant. Its claims follow its mapping, and it passes the whole matrix."""

    @pytest.fixture
    def auth_provider(self, key_server: KeyServer, client_id: str) -> OidcProvider:
        return TenantProvider(
            OidcConfig(
                name="azure", issuer=key_server.issuer, client_id=client_id, required_claims={"tid": ("tenant-a",)},
                email_verified_claim="xms_edov", require_verified_email=False, admin_roles=("CMBCluster.Admin",),
            )
        )  # fmt: skip

    @pytest.fixture
    def valid_claims(self, base_claims: dict[str, Any]) -> dict[str, Any]:
        return {**base_claims, "tid": "tenant-a"}


class TestUnvouchedAddressTokenContract(AuthProviderContract):
    """An issuer that never vouches for addresses (Entra's ``preferred_username``): people sign in,
    their addresses grant nothing, and the suite expects them unverified."""

    @pytest.fixture
    def client_id(self) -> str:
        return CLIENT_ID  # tenant_provider's

    @pytest.fixture
    def auth_provider(self, key_server: KeyServer, client_id: str) -> OidcProvider:
        return tenant_provider(key_server.issuer)

    @pytest.fixture
    def valid_claims(self, base_claims: dict[str, Any]) -> dict[str, Any]:
        return {**base_claims, "tid": "tenant-a"}


def test_an_issuer_that_never_vouches_cannot_require_verified_addresses() -> None:
    with pytest.raises(ValueError, match="require_verified_email needs an email_verified_claim"):
        OidcConfig(name="x", issuer="https://x", client_id="c", email_verified_claim=None)


def test_only_the_declared_claim_vouches_for_an_address(keys: KeyServer) -> None:
    """``email_verified: true`` is no vouching for a provider that declares another claim (xms_edov)."""
    entra = OidcProvider(
        OidcConfig(name="azure", issuer=keys.issuer, client_id=CLIENT_ID, email_verified_claim="xms_edov",
                   require_verified_email=False)
    )  # fmt: skip
    claims = {"sub": "u-1", "aud": CLIENT_ID, "email": "ada@uni.example"}
    assert entra.exchange_token(keys.sign({**claims, "email_verified": True})).email_verified is False
    assert entra.exchange_token(keys.sign({**claims, "xms_edov": True})).email_verified is True
    assert entra.exchange_token(keys.sign({**claims, "xms_edov": "true"})).email_verified is True


def test_the_public_module_is_the_implementation() -> None:
    import cmbcluster.oidc as public
    from cmbcluster.oidc import provider as implementation

    assert set(public.__all__) <= set(dir(implementation))
    assert all(getattr(public, name) is getattr(implementation, name) for name in public.__all__)
