"""Sign in with Google: ID-token rules against a real loopback key server, and the whole
browser-less code flow through the control plane against a real OpenID Connect provider
(oidc-provider-mock standing in for accounts.google.com)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient

from cmbcluster import ProviderContext
from cmbcluster.app import create_app
from cmbcluster.errors import AuthenticationFailed, ConfigurationError
from cmbcluster.settings import CoreSettings
from cmbcluster.testing.api import LOCAL
from cmbcluster.testing.auth import AuthProviderContract
from cmbcluster.testing.oidc import KeyServer, OidcMockServer
from cmbcluster_gcp.auth import GoogleProvider, google_provider
from cmbcluster_gcp.plugin import _google_auth
from cmbcluster_gcp.settings import GcpSettings

CLIENT_ID = "1234-cmbcluster.apps.googleusercontent.com"
GOOGLE = "https://accounts.google.com"


def _settings(keys: KeyServer, **extra: str) -> GcpSettings:
    return GcpSettings(
        project_id="cmbcluster-test",
        google_client_id=CLIENT_ID,
        google_discovery_url=f"{keys.url}/.well-known/openid-configuration",
        **extra,  # type: ignore[arg-type]
    )


@pytest.fixture
def keys() -> Iterator[KeyServer]:
    with KeyServer(issuer=GOOGLE, kids=("key-1", "key-2")) as server:
        server.published = {"key-1"}
        yield server


@pytest.fixture
def google(keys: KeyServer) -> GoogleProvider:
    return google_provider(_settings(keys))


def claims(**extra: object) -> dict[str, object]:
    return {"sub": "1098765", "aud": CLIENT_ID, "email": "grace@example.org", "email_verified": True, **extra}


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _core(data_dir: Path) -> CoreSettings:
    """Only Google sign-in is under test: everything else is local."""
    return CoreSettings(
        data_dir=data_dir,
        auth_providers=["gcp"],
        storage_backend="local",
        compute_backend="local",
        infra_provider="local",
    )


# -- ID-token rules ---------------------------------------------------------------------------------
def test_google_id_token_is_accepted_and_keys_are_cached(google: GoogleProvider, keys: KeyServer) -> None:
    token = keys.sign(claims(nonce="n-1", name="Grace Hopper", picture="https://lh3.example/p.png"))
    user = google.user_info(google.validate_token(token, nonce="n-1"))
    assert (user.provider, user.subject, user.email, user.email_verified, user.name) == (
        "gcp",
        "1098765",
        "grace@example.org",
        True,
        "Grace Hopper",
    )
    assert user.roles == ()  # Google has no groups: admins come from CMBCLUSTER_ADMIN_EMAILS
    assert google.exchange_token(keys.sign(claims())).email == "grace@example.org"  # API clients' ID tokens
    assert keys.jwks_requests == 1  # the certificates are fetched once and cached


def test_issuer_without_https_is_accepted(google: GoogleProvider, keys: KeyServer) -> None:
    assert google.validate_token(keys.sign(claims(iss="accounts.google.com")))["sub"] == "1098765"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"aud": "someone-elses-client.apps.googleusercontent.com"}, "audience"),
        ({"iss": "https://accounts.evil.example"}, "issuer"),
        ({"iss": "http://accounts.google.com"}, "issuer"),
        ({"email_verified": False}, "not verified"),
        ({"email_verified": None}, "not verified"),
        ({"email": ""}, "not verified"),
        ({"exp": int(time.time()) - 120}, "expired"),
        ({"iat": int(time.time()) + 3600, "exp": int(time.time()) + 7200}, "future"),
    ],
)
def test_bad_google_tokens_are_rejected(
    google: GoogleProvider, keys: KeyServer, change: dict[str, object], message: str
) -> None:
    token_claims = claims()
    token_claims.update(change)
    with pytest.raises(AuthenticationFailed, match=message):
        google.validate_token(keys.sign(token_claims))


def test_expiry_allows_a_small_clock_skew(google: GoogleProvider, keys: KeyServer) -> None:
    assert google.validate_token(keys.sign(claims(exp=int(time.time()) - 20)))


def test_forged_signatures_and_alg_none_are_rejected(google: GoogleProvider, keys: KeyServer) -> None:
    # signed by a key Google never published, under the kid of one it did
    with pytest.raises(AuthenticationFailed, match="signature"):
        google.validate_token(keys.sign(claims(), kid="key-2", header={"kid": "key-1"}))
    # a genuine signature moved onto other claims
    swapped = keys.sign(claims(sub="attacker")).rsplit(".", 1)[0] + "." + keys.sign(claims()).rsplit(".", 1)[1]
    with pytest.raises(AuthenticationFailed, match="signature"):
        google.validate_token(swapped)
    full = {"iss": GOOGLE, "iat": int(time.time()), "exp": int(time.time()) + 300, **claims()}
    with pytest.raises(AuthenticationFailed, match="algorithm"):
        google.validate_token(f"{_b64({'alg': 'none', 'kid': 'key-1'})}.{_b64(full)}.")
    with pytest.raises(AuthenticationFailed, match="unknown key"):
        google.validate_token(keys.sign(claims(), kid="key-2"))  # not published


def test_allowed_hosted_domains(keys: KeyServer) -> None:
    provider = google_provider(_settings(keys, google_allowed_domains=" example.org, Physics.Example.edu ,"))
    assert provider.validate_token(keys.sign(claims(hd="example.org")))
    assert provider.validate_token(keys.sign(claims(hd="physics.example.edu")))
    for hd in ("other.org", "example.org.evil.example", None):
        token_claims = claims() if hd is None else claims(hd=hd)  # None: a consumer (gmail) account
        with pytest.raises(AuthenticationFailed, match="hosted domain"):
            provider.validate_token(keys.sign(token_claims))


def test_authorization_url(google: GoogleProvider, keys: KeyServer) -> None:
    from cmbcluster.interfaces import AuthorizationRequest

    request = AuthorizationRequest(redirect_uri="https://c.example/cb", state="s", nonce="n", code_challenge="c")
    url = urlsplit(google.authorization_url(request))
    assert f"{url.scheme}://{url.netloc}{url.path}" == f"{keys.url}/authorize"
    query = parse_qs(url.query)
    assert query["scope"] == ["openid email profile"] and query["client_id"] == [CLIENT_ID]
    assert "access_type" not in query and "prompt" not in query and "hd" not in query
    one_domain = google_provider(_settings(keys, google_allowed_domains="example.org"))
    assert parse_qs(urlsplit(one_domain.authorization_url(request)).query)["hd"] == ["example.org"]


# -- configuration ------------------------------------------------------------------------------------
def test_missing_client_id_is_a_configuration_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = ProviderContext(core=CoreSettings(data_dir=tmp_path), provider_settings=GcpSettings(project_id="cmb-project"))
    with pytest.raises(ConfigurationError, match="GOOGLE_CLIENT_ID") as caught:
        _google_auth(ctx)
    assert any("GOOGLE_CLIENT_ID" in problem for problem in caught.value.problems)
    monkeypatch.setenv("PROJECT_ID", "cmb-project")
    with pytest.raises(ConfigurationError, match="GOOGLE_CLIENT_ID"):
        create_app(_core(tmp_path))


def test_plugin_import_loads_no_cloud_or_http_library() -> None:
    code = (
        "import sys, cmbcluster_gcp.plugin\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('google', 'httpx', 'joserfc'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == ""


# -- the whole flow against a real OpenID Connect provider ------------------------------------------
@pytest.fixture(scope="module")
def oidc_server() -> Iterator[OidcMockServer]:
    with OidcMockServer() as server:
        yield server


@pytest.fixture
def google_client(tmp_path: Path, oidc_server: OidcMockServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("PROJECT_ID", "cmbcluster-test")
    monkeypatch.setenv("GOOGLE_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("GOOGLE_CLIENT_SECRET", "client-secret")
    monkeypatch.setenv("GOOGLE_ISSUER", oidc_server.issuer)
    with TestClient(create_app(_core(tmp_path / "data")), base_url=LOCAL) as client:
        yield client


def _sign_in(client: TestClient, server: OidcMockServer, sub: str) -> int:
    start = client.get("/api/v1/auth/gcp/login", params={"next": "/storage"}, follow_redirects=False)
    assert start.status_code == 303
    authorize_url = start.headers["location"]
    assert authorize_url.startswith(server.issuer)
    query = parse_qs(urlsplit(authorize_url).query)
    assert query["scope"] == ["openid email profile"] and query["code_challenge_method"] == ["S256"]
    callback = urlsplit(server.authorize(authorize_url, sub))
    done = client.get(f"{callback.path}?{callback.query}", follow_redirects=False)
    if done.status_code == 303:
        assert done.headers["location"] == "/storage"
    else:
        assert "not verified" in done.text, done.text
    return int(done.status_code)


def test_sign_in_with_google_through_a_real_oidc_provider(
    google_client: TestClient, oidc_server: OidcMockServer
) -> None:
    providers = google_client.get("/api/v1/auth/providers").json()["providers"]
    assert [(p["name"], p["display_name"]) for p in providers] == [("gcp", "Google")]
    oidc_server.put_user("g-1", {"email": "grace@example.org", "email_verified": True, "name": "Grace Hopper"})
    assert _sign_in(google_client, oidc_server, "g-1") == 303
    me = google_client.get("/api/v1/auth/me").json()
    assert (me["email"], me["name"]) == ("grace@example.org", "Grace Hopper")
    assert google_client.get("/readyz").json()["checks"]["auth:gcp"] == "ok"


def test_unverified_google_email_cannot_sign_in(google_client: TestClient, oidc_server: OidcMockServer) -> None:
    oidc_server.put_user("g-2", {"email": "mallory@example.org", "email_verified": False})
    assert _sign_in(google_client, oidc_server, "g-2") == 401
    assert google_client.get("/api/v1/auth/me").status_code == 401


# -- the token-verification contract (cmbcluster.testing.auth) ------------------------------------
class TestGoogleTokenContract(AuthProviderContract):
    @pytest.fixture
    def key_server(self) -> Iterator[KeyServer]:
        with KeyServer(issuer=GOOGLE, kids=("key-1", "key-2"), ec_kids=("ec-1",)) as server:
            server.published = {"key-1", "ec-1"}
            yield server

    @pytest.fixture
    def client_id(self) -> str:
        return CLIENT_ID

    @pytest.fixture
    def auth_provider(self, key_server: KeyServer) -> GoogleProvider:
        return google_provider(_settings(key_server))
