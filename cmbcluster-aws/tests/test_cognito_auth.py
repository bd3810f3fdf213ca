"""CognitoProvider against real Cognito tokens from moto (server mode, over HTTP), plus
hand-made tokens from a KeyServer for what moto cannot issue (expired, refresh, unknown key)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import httpx
import pytest
from fastapi.testclient import TestClient
from joserfc.jwk import RSAKey

from cmbcluster import ProviderContext
from cmbcluster.app import create_app
from cmbcluster.errors import AuthenticationFailed, ConfigurationError, ProviderUnavailable
from cmbcluster.interfaces import AuthorizationRequest
from cmbcluster.settings import CoreSettings
from cmbcluster.testing.api import LOCAL
from cmbcluster.testing.auth import AuthProviderContract, standard_claims
from cmbcluster.testing.oidc import KeyServer
from cmbcluster_aws.auth import CognitoProvider
from cmbcluster_aws.plugin import _cognito_auth
from cmbcluster_aws.settings import AwsSettings

REGION = "eu-west-1"  # as in conftest.py
ACCOUNT_ID = "123456789012"

PASSWORD = "Sup3r-secret-passw0rd!"


@dataclass
class Pool:
    endpoint: str
    client: Any  # boto3 cognito-idp
    pool_id: str
    client_id: str
    client_secret: str
    other_client_id: str

    @property
    def issuer(self) -> str:
        return f"https://cognito-idp.{REGION}.amazonaws.com/{self.pool_id}"

    @property
    def jwks_url(self) -> str:
        return f"{self.endpoint}/{self.pool_id}/.well-known/jwks.json"

    def add_user(self, email: str, *, groups: tuple[str, ...] = (), verified: bool = True) -> None:
        username = email.split("@")[0]
        self.client.admin_create_user(
            UserPoolId=self.pool_id,
            Username=username,
            UserAttributes=[
                {"Name": "email", "Value": email},
                {"Name": "email_verified", "Value": "true" if verified else "false"},
            ],
            MessageAction="SUPPRESS",
        )
        self.client.admin_set_user_password(
            UserPoolId=self.pool_id, Username=username, Password=PASSWORD, Permanent=True
        )
        for group in groups:
            self.client.admin_add_user_to_group(UserPoolId=self.pool_id, Username=username, GroupName=group)

    def tokens(self, email: str, *, client_id: str | None = None) -> dict[str, str]:
        """USER_PASSWORD_AUTH: real RS256 IdToken and AccessToken (moto ignores SECRET_HASH)."""
        result = self.client.initiate_auth(
            ClientId=client_id or self.client_id,
            AuthFlow="USER_PASSWORD_AUTH",
            AuthParameters={"USERNAME": email.split("@")[0], "PASSWORD": PASSWORD},
        )["AuthenticationResult"]
        return {"id": result["IdToken"], "access": result["AccessToken"]}


@pytest.fixture
def pool(moto_reset: str) -> Iterator[Pool]:
    client = boto3.client("cognito-idp", region_name=REGION, endpoint_url=moto_reset)
    pool_id = client.create_user_pool(PoolName="cmbcluster")["UserPool"]["Id"]
    app = client.create_user_pool_client(
        UserPoolId=pool_id,
        ClientName="cmbcluster",
        GenerateSecret=True,
        ExplicitAuthFlows=["ALLOW_USER_PASSWORD_AUTH", "ALLOW_REFRESH_TOKEN_AUTH"],
        ReadAttributes=["email", "email_verified", "name"],
    )["UserPoolClient"]
    other = client.create_user_pool_client(
        UserPoolId=pool_id,
        ClientName="another-app",
        ExplicitAuthFlows=["ALLOW_USER_PASSWORD_AUTH"],
        ReadAttributes=["email", "email_verified"],
    )["UserPoolClient"]
    client.create_group(UserPoolId=pool_id, GroupName="admins")
    client.create_group(UserPoolId=pool_id, GroupName="physics")
    yield Pool(moto_reset, client, pool_id, app["ClientId"], app["ClientSecret"], other["ClientId"])
    client.close()


@pytest.fixture
def cognito_settings(pool: Pool, make_settings: Callable[..., AwsSettings]) -> Callable[..., AwsSettings]:
    def make(**overrides: Any) -> AwsSettings:
        values: dict[str, Any] = {
            "cognito_user_pool_id": pool.pool_id,
            "cognito_client_id": pool.client_id,
            "cognito_client_secret": pool.client_secret,
            "cognito_jwks_url": pool.jwks_url,
            "cognito_domain": "cmbtest.auth.eu-west-1.amazoncognito.com",
        }
        values.update(overrides)
        return make_settings(**values)

    return make


@pytest.fixture
def provider(cognito_settings: Callable[..., AwsSettings]) -> Iterator[CognitoProvider]:
    cognito = CognitoProvider.from_settings(cognito_settings())
    yield cognito
    cognito._http.close()


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _payload(token: str) -> dict[str, Any]:
    part = token.split(".")[1]
    loaded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return loaded


# -- real Cognito tokens (moto) --------------------------------------------------------------------
def test_id_tokens_are_accepted_and_map_groups_to_roles(provider: CognitoProvider, pool: Pool) -> None:
    pool.add_user("grace@example.org", groups=("admins", "physics"))
    tokens = pool.tokens("grace@example.org")

    id_claims = provider.validate_token(tokens["id"])
    assert id_claims["token_use"] == "id" and id_claims["aud"] == pool.client_id
    user = provider.user_info(id_claims)
    assert user.provider == "aws"
    assert user.subject == id_claims["sub"] and user.subject
    assert (user.email, user.email_verified, user.name) == ("grace@example.org", True, "grace")
    assert set(user.groups) == {"admins", "physics"} and user.roles == ("admin",)

    assert provider.exchange_token(tokens["id"]).email == "grace@example.org"


def test_access_tokens_are_refused_on_every_path(provider: CognitoProvider, pool: Pool) -> None:
    """The browser callback validates with validate_token, API clients with exchange_token: an
    access token (no verified address, meant for resource servers) signs in on neither."""
    pool.add_user("grace@example.org", groups=("admins",))
    access = pool.tokens("grace@example.org")["access"]
    with pytest.raises(AuthenticationFailed, match="ID token"):
        provider.validate_token(access)
    with pytest.raises(AuthenticationFailed, match="ID token"):
        provider.exchange_token(access)


def test_users_outside_admin_groups_are_plain_users(provider: CognitoProvider, pool: Pool) -> None:
    pool.add_user("lin@example.org", groups=("physics",), verified=False)
    user = provider.exchange_token(pool.tokens("lin@example.org")["id"])
    assert user.groups == ("physics",) and user.roles == ()
    assert user.email_verified is False


def test_admin_groups_come_from_the_config(cognito_settings: Callable[..., AwsSettings], pool: Pool) -> None:
    pool.add_user("ann@example.org", groups=("physics",))
    base = CognitoProvider.from_settings(cognito_settings())
    custom = CognitoProvider(replace(base.config, admin_groups=("physics",)), domain=base.domain)
    assert custom.exchange_token(pool.tokens("ann@example.org")["id"]).roles == ("admin",)


def test_tokens_of_another_app_client_are_rejected(provider: CognitoProvider, pool: Pool) -> None:
    pool.add_user("eve@example.org")
    tokens = pool.tokens("eve@example.org", client_id=pool.other_client_id)
    with pytest.raises(AuthenticationFailed, match="audience"):
        provider.validate_token(tokens["id"])


def test_tokens_of_another_issuer_are_rejected(cognito_settings: Callable[..., AwsSettings], pool: Pool) -> None:
    pool.add_user("eve@example.org")
    tokens = pool.tokens("eve@example.org")
    # another pool's tokens, even signed by keys this deployment trusts
    other_pool = CognitoProvider.from_settings(cognito_settings(cognito_user_pool_id=f"{pool.pool_id}x"))
    with pytest.raises(AuthenticationFailed, match="issuer"):
        other_pool.validate_token(tokens["id"])
    overridden = CognitoProvider.from_settings(cognito_settings(cognito_issuer="https://issuer.example/pool"))
    with pytest.raises(AuthenticationFailed, match="issuer"):
        overridden.validate_token(tokens["id"])


def test_alg_none_hmac_confusion_and_tampering_are_rejected(provider: CognitoProvider, pool: Pool) -> None:
    pool.add_user("mallory@example.org")
    token = pool.tokens("mallory@example.org")["id"]
    claims = {**_payload(token), "cognito:groups": ["admins"]}
    kid = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "==").decode())["kid"]

    unsigned = f"{_b64({'alg': 'none', 'kid': kid})}.{_b64(claims)}."
    with pytest.raises(AuthenticationFailed, match="algorithm"):
        provider.validate_token(unsigned)

    # HS256 "signed" with the pool's public key, fetched from its JWKS like an attacker would
    jwks = httpx.get(pool.jwks_url, timeout=5).json()
    public_pem = RSAKey.import_key(jwks["keys"][0]).as_pem(private=False)
    signing_input = f"{_b64({'alg': 'HS256', 'kid': kid})}.{_b64(claims)}"
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    forged = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    with pytest.raises(AuthenticationFailed, match="algorithm"):
        provider.validate_token(forged)

    header, _, signature = token.split(".")
    with pytest.raises(AuthenticationFailed, match="signature"):
        provider.validate_token(f"{header}.{_b64(claims)}.{signature}")  # promoted itself to admins
    with pytest.raises(AuthenticationFailed, match="malformed"):
        provider.validate_token("not-a-token")


def test_only_rs256_can_be_configured(provider: CognitoProvider) -> None:
    config = replace(provider.config, algorithms=("RS256", "ES256"))
    with pytest.raises(ValueError, match="RS256"):
        CognitoProvider(config)


# -- hand-made tokens (a KeyServer posing as the pool) ---------------------------------------------
@pytest.fixture
def keys(pool: Pool) -> Iterator[KeyServer]:
    with KeyServer(issuer=pool.issuer, kids=("key-1", "key-2")) as server:
        server.published = {"key-1"}
        yield server


@pytest.fixture
def keyed_provider(cognito_settings: Callable[..., AwsSettings], keys: KeyServer) -> CognitoProvider:
    return CognitoProvider.from_settings(cognito_settings(cognito_jwks_url=f"{keys.url}/jwks"))


def _claims(pool: Pool, **extra: object) -> dict[str, object]:
    return {
        "sub": "0b1c2d3e",
        "aud": pool.client_id,
        "token_use": "id",
        "email": "grace@example.org",
        "email_verified": True,
        **extra,
    }


def test_a_well_formed_hand_made_token_is_accepted(
    keyed_provider: CognitoProvider, keys: KeyServer, pool: Pool
) -> None:
    user = keyed_provider.exchange_token(keys.sign(_claims(pool, **{"cognito:groups": ["admins"]})))
    assert user.roles == ("admin",) and user.subject == "0b1c2d3e"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"token_use": "refresh"}, "token_use"),
        ({"token_use": None}, "token_use"),
        ({"token_use": "access", "aud": None, "client_id": "x"}, "ID token"),  # access tokens never sign in
        ({"exp": int(time.time()) - 600}, "expired"),
        ({"iat": int(time.time()) + 3600, "exp": int(time.time()) + 7200}, "future"),
        ({"iss": "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_other"}, "issuer"),
        ({"cognito:groups": "admins"}, "cognito:groups"),
    ],
)
def test_hand_made_tokens_with_bad_claims_are_rejected(
    keyed_provider: CognitoProvider, keys: KeyServer, pool: Pool, change: dict[str, object], message: str
) -> None:
    claims = {k: v for k, v in {**_claims(pool), **change}.items() if v is not None}
    with pytest.raises(AuthenticationFailed, match=message):
        keyed_provider.validate_token(keys.sign(claims))


def test_expiry_allows_a_small_clock_skew(keyed_provider: CognitoProvider, keys: KeyServer, pool: Pool) -> None:
    assert keyed_provider.validate_token(keys.sign(_claims(pool, exp=int(time.time()) - 10)))


def test_unknown_kid_refreshes_the_cached_jwks(keyed_provider: CognitoProvider, keys: KeyServer, pool: Pool) -> None:
    keyed_provider.validate_token(keys.sign(_claims(pool)))
    keyed_provider.validate_token(keys.sign(_claims(pool)))
    assert keys.jwks_requests == 1  # cached
    keyed_provider.jwks._min_refresh = 0  # the test does not wait out the refresh floor
    with pytest.raises(AuthenticationFailed, match="unknown key"):
        keyed_provider.validate_token(keys.sign(_claims(pool), kid="key-2"))
    assert keys.jwks_requests == 2
    keys.published = {"key-1", "key-2"}  # the pool rotates its keys
    assert keyed_provider.validate_token(keys.sign(_claims(pool), kid="key-2"))
    assert keys.jwks_requests == 3


# -- endpoints, readiness, factory -----------------------------------------------------------------
def test_endpoints_come_from_the_hosted_ui_domain(provider: CognitoProvider, pool: Pool) -> None:
    url = provider.authorization_url(
        AuthorizationRequest(redirect_uri="https://cmb.example/cb", state="s-1", nonce="n-1", code_challenge="c-1")
    )
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == (
        "https",
        "cmbtest.auth.eu-west-1.amazoncognito.com",
        "/oauth2/authorize",
    )
    query = parse_qs(parts.query)
    assert query["client_id"] == [pool.client_id] and query["code_challenge_method"] == ["S256"]
    assert query["scope"] == ["openid email profile"]
    assert provider.metadata()["token_endpoint"] == "https://cmbtest.auth.eu-west-1.amazoncognito.com/oauth2/token"
    assert provider.metadata()["jwks_uri"] == pool.jwks_url
    assert provider.display_name == "Cognito"


def test_token_requests_go_to_the_hosted_ui_with_the_client_secret(
    cognito_settings: Callable[..., AwsSettings], pool: Pool
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200, json={"id_token": "i", "access_token": "a", "refresh_token": "r", "expires_in": 3600}
        )

    settings = cognito_settings(cognito_domain="https://login.cmb.example/")
    provider = CognitoProvider.from_settings(settings, http=httpx.Client(transport=httpx.MockTransport(handler)))
    tokens = provider.exchange_code("code-1", redirect_uri="https://cmb.example/cb", code_verifier="v-1")
    assert tokens.id_token == "i" and tokens.refresh_token == "r"
    assert str(seen[0].url) == "https://login.cmb.example/oauth2/token"
    expected = base64.b64encode(f"{pool.client_id}:{pool.client_secret}".encode()).decode()
    assert seen[0].headers["authorization"] == f"Basic {expected}"


def test_readiness_fetches_the_pool_keys(
    provider: CognitoProvider, cognito_settings: Callable[..., AwsSettings]
) -> None:
    provider.check_ready()
    broken = CognitoProvider.from_settings(cognito_settings(cognito_jwks_url="http://127.0.0.1:9/jwks.json"))
    with pytest.raises(ProviderUnavailable):
        broken.check_ready()


def test_without_overrides_the_real_cognito_urls_are_used(make_settings: Callable[..., AwsSettings]) -> None:
    settings = make_settings(cognito_user_pool_id="eu-west-1_AbC", cognito_client_id="client-1")
    cognito = CognitoProvider.from_settings(settings)
    issuer = "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbC"
    assert cognito.config.issuer == issuer
    assert cognito.config.jwks_url == f"{issuer}/.well-known/jwks.json"
    assert cognito.config.client_secret is None and cognito.domain is None


def test_a_pool_in_another_region_than_the_cluster_is_verified_against_its_own_region(
    make_settings: Callable[..., AwsSettings],
) -> None:
    # the cluster in eu-west-1, the pool in us-east-1: Cognito issues the pool's tokens from us-east-1
    settings = make_settings(cognito_user_pool_id="us-east-1_AbC", cognito_client_id="client-1")
    cognito = CognitoProvider.from_settings(settings)
    assert cognito.config.issuer == "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbC"


def test_factory_lists_missing_pool_and_client(make_settings: Callable[..., AwsSettings]) -> None:
    core = CoreSettings(data_dir=Path("unused"))
    with pytest.raises(ConfigurationError) as caught:
        _cognito_auth(ProviderContext(core=core, provider_settings=make_settings()))
    assert [p.split()[0] for p in caught.value.problems] == ["COGNITO_USER_POOL_ID", "COGNITO_CLIENT_ID"]
    with pytest.raises(ConfigurationError) as caught:
        _cognito_auth(ProviderContext(core=core, provider_settings=make_settings(cognito_user_pool_id="eu-west-1_x")))
    assert [p.split()[0] for p in caught.value.problems] == ["COGNITO_CLIENT_ID"]
    built = _cognito_auth(
        ProviderContext(core=core, provider_settings=make_settings(cognito_user_pool_id="p", cognito_client_id="c"))
    )
    assert isinstance(built, CognitoProvider)


def test_plugin_import_loads_no_sdk_and_no_jose() -> None:
    code = (
        "import sys, cmbcluster_aws.plugin\n"
        "loaded = [m for m in ('boto3', 'botocore', 'joserfc', 'httpx', 'cmbcluster_aws.auth') if m in sys.modules]\n"
        "print(', '.join(loaded))\n"
        "sys.exit(1 if loaded else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"loaded at import: {result.stdout}{result.stderr}"


# -- through the core API --------------------------------------------------------------------------
@pytest.fixture
def api(pool: Pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name, value in {
        "AWS_REGION": REGION,
        "AWS_ACCOUNT_ID": ACCOUNT_ID,
        "COGNITO_USER_POOL_ID": pool.pool_id,
        "COGNITO_CLIENT_ID": pool.client_id,
        "COGNITO_CLIENT_SECRET": pool.client_secret,
        "COGNITO_JWKS_URL": pool.jwks_url,
        "COGNITO_DOMAIN": "cmbtest.auth.eu-west-1.amazoncognito.com",  # moto has no hosted UI: not fetched
        "AWS_ENDPOINT_URL": pool.endpoint,
    }.items():
        monkeypatch.setenv(name, value)
    settings = CoreSettings(
        cloud_provider="local", auth_providers=["aws"], storage_backend="local", data_dir=tmp_path / "data"
    )
    with TestClient(create_app(settings), base_url=LOCAL) as client:
        yield client


def _exchange(api: TestClient, token: str) -> httpx.Response:
    api.cookies.clear()
    response: httpx.Response = api.post("/api/v1/auth/exchange", json={"provider": "aws", "token": token})
    return response


def test_exchange_through_the_api_maps_cognito_groups(api: TestClient, pool: Pool) -> None:
    providers = api.get("/api/v1/auth/providers").json()["providers"]
    assert [(p["name"], p["display_name"]) for p in providers] == [("aws", "Cognito")]

    pool.add_user("first@example.org")  # the first user is an admin whatever the groups
    assert _exchange(api, pool.tokens("first@example.org")["id"]).json()["user"]["role"] == "admin"

    pool.add_user("grace@example.org", groups=("admins",))
    pool.add_user("lin@example.org", groups=("physics",))
    for email, role in (("grace@example.org", "admin"), ("lin@example.org", "user")):
        response = _exchange(api, pool.tokens(email)["id"])
        assert response.status_code == 200, response.text
        me = api.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {response.json()['token']}"}).json()
        assert (me["email"], me["role"]) == (email, role)

    refused = _exchange(api, pool.tokens("lin@example.org", client_id=pool.other_client_id)["id"])
    assert refused.status_code == 401
    assert api.get("/readyz").json()["checks"]["auth:aws"] == "ok"


# -- the token-verification contract (cmbcluster.testing.auth) ------------------------------------
class TestCognitoTokenContract(AuthProviderContract):
    @pytest.fixture
    def key_server(self, pool: Pool) -> Iterator[KeyServer]:
        with KeyServer(issuer=pool.issuer, kids=("key-1", "key-2"), ec_kids=("ec-1",)) as server:
            server.published = {"key-1", "ec-1"}
            yield server

    @pytest.fixture
    def client_id(self, pool: Pool) -> str:
        return pool.client_id

    @pytest.fixture
    def valid_claims(self, client_id: str) -> dict[str, Any]:
        return {**standard_claims(client_id), "token_use": "id"}

    @pytest.fixture
    def auth_provider(
        self, key_server: KeyServer, cognito_settings: Callable[..., AwsSettings]
    ) -> Iterator[CognitoProvider]:
        cognito = CognitoProvider.from_settings(cognito_settings(cognito_jwks_url=f"{key_server.url}/jwks"))
        yield cognito
        cognito._http.close()
