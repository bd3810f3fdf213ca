"""The token-verification contract every auth provider must pass, as a suite to subclass.

Tokens are minted by a local :class:`~cmbcluster.testing.oidc.KeyServer` (a JWKS the test
controls), so every check of an ID token is exercised, including those a real identity provider
would never let a test produce::

    from cmbcluster.testing.auth import AuthProviderContract

    class TestEntraTokens(AuthProviderContract):
        @pytest.fixture
        def auth_provider(self, key_server, client_id):
            return EntraProvider(OidcConfig(name="azure", issuer=key_server.issuer, client_id=client_id))

        @pytest.fixture
        def valid_claims(self, base_claims):  # what your provider needs besides the standard claims
            return {**base_claims, "tid": "my-tenant"}

Fixtures you may override: ``key_server`` (issuer, published keys), ``client_id``,
``claim_mapping`` and ``valid_claims``; ``auth_provider`` is yours to provide. The provider must be
configured to trust ``key_server``'s issuer and JWKS and to allow only RS256.

The claims follow the provider's own mapping (:class:`ClaimMapping`, read from an
:class:`~cmbcluster.oidc.OidcProvider`'s ``config``): the address goes in its ``email_claim``, and
its ``email_verified_claim`` says the address is verified (Entra ID's ``xms_edov``, say). A provider
whose issuer never vouches for addresses (``email_verified_claim=None``) passes with its addresses
unverified: the suite then expects ``email_verified`` False. Whatever the mapping, a token whose
address is not vouched for in the declared claim never makes an admin nor reaches an existing
account, even when it carries ``email_verified: true`` in a claim the provider did not declare.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from cmbcluster.errors import AuthenticationFailed, CmbclusterError
from cmbcluster.interfaces import AuthProvider, UserInfo
from cmbcluster.testing.oidc import KeyServer

CLIENT_ID = "cmbcluster-contract"
ADMIN_EMAIL = "grace@example.org"


@dataclass(frozen=True)
class ClaimMapping:
    """Where a provider reads the address (``email_claim``) and the issuer's word that it verified
    it (``email_verified_claim``; None: the issuer never vouches)."""

    email_claim: str = "email"
    email_verified_claim: str | None = "email_verified"

    @classmethod
    def of(cls, provider: AuthProvider) -> ClaimMapping:
        """An OidcProvider's mapping (its ``config``), else OpenID Connect's standard one."""
        from cmbcluster.oidc import OidcConfig

        config = getattr(provider, "config", None)
        if isinstance(config, OidcConfig):
            return cls(config.email_claim, config.email_verified_claim)
        return cls()


def standard_claims(
    client_id: str, *, email_claim: str = "email", email_verified_claim: str | None = "email_verified"
) -> dict[str, Any]:
    """The claims of a valid ID token besides ``iss``/``iat``/``exp`` (which the key server adds): the
    address ``ADMIN_EMAIL`` in ``email_claim``, vouched for in ``email_verified_claim`` (if any)."""
    claims: dict[str, Any] = {"sub": "u-1", "aud": client_id, email_claim: ADMIN_EMAIL, "name": "Grace"}
    if email_verified_claim is not None:
        claims[email_verified_claim] = True
    return claims


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


class AuthProviderContract:
    """Subclass it; provide ``auth_provider``. Every test refuses a token a provider must refuse."""

    @pytest.fixture
    def key_server(self) -> Iterator[KeyServer]:
        with KeyServer(kids=("key-1", "key-2"), ec_kids=("ec-1",)) as server:
            server.published = {"key-1", "ec-1"}  # key-2 is never published
            yield server

    @pytest.fixture
    def client_id(self) -> str:
        return CLIENT_ID

    @pytest.fixture
    def auth_provider(self, key_server: KeyServer, client_id: str) -> AuthProvider:
        raise NotImplementedError("provide the auth_provider fixture: your provider, trusting key_server")

    @pytest.fixture
    def claim_mapping(self, auth_provider: AuthProvider) -> ClaimMapping:
        """The provider's claim mapping (an OidcProvider's own; override it for another provider)."""
        return ClaimMapping.of(auth_provider)

    @pytest.fixture
    def base_claims(self, client_id: str, claim_mapping: ClaimMapping) -> dict[str, Any]:
        """The standard claims in the provider's mapping: extend them in ``valid_claims``."""
        return standard_claims(
            client_id, email_claim=claim_mapping.email_claim, email_verified_claim=claim_mapping.email_verified_claim
        )

    @pytest.fixture
    def valid_claims(self, base_claims: dict[str, Any]) -> dict[str, Any]:
        return base_claims

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def refused(provider: AuthProvider, token: str, *, nonce: str | None = None) -> None:
        """The token is refused by both ways in: the browser callback's and the API exchange's."""
        with pytest.raises(AuthenticationFailed):
            provider.validate_token(token, nonce=nonce)
        if nonce is None:
            with pytest.raises(AuthenticationFailed):
                provider.exchange_token(token)

    # -- what must pass --------------------------------------------------------------------------
    def test_a_valid_id_token_is_accepted(
        self, auth_provider: AuthProvider, key_server: KeyServer, valid_claims: dict[str, Any],
        claim_mapping: ClaimMapping,
    ) -> None:  # fmt: skip
        claims = auth_provider.validate_token(key_server.sign({**valid_claims, "nonce": "n-1"}), nonce="n-1")
        user = auth_provider.user_info(claims)
        assert isinstance(user, UserInfo)
        assert user.subject == valid_claims["sub"]
        assert user.email == ADMIN_EMAIL, (
            f"the provider reads the address from {claim_mapping.email_claim!r}: valid_claims must carry "
            f"{ADMIN_EMAIL!r} there (start valid_claims from the base_claims fixture)"
        )
        # verified exactly when the issuer vouches for it, in the claim the provider declares
        assert user.email_verified is (claim_mapping.email_verified_claim is not None)
        assert auth_provider.exchange_token(key_server.sign(valid_claims)).subject == valid_claims["sub"]

    def test_several_audiences_with_our_client_as_azp_are_accepted(
        self, auth_provider: AuthProvider, key_server: KeyServer, valid_claims: dict[str, Any], client_id: str
    ) -> None:
        token = key_server.sign({**valid_claims, "aud": [client_id, "other-api"], "azp": client_id})
        assert auth_provider.validate_token(token)["sub"] == valid_claims["sub"]

    # -- signatures and headers --------------------------------------------------------------------
    def test_alg_none_is_refused(
        self, auth_provider: AuthProvider, key_server: KeyServer, valid_claims: dict[str, Any]
    ) -> None:
        full = {"iss": key_server.issuer, "iat": int(time.time()), "exp": int(time.time()) + 300, **valid_claims}
        self.refused(auth_provider, f"{_b64({'alg': 'none', 'kid': 'key-1'})}.{_b64(full)}.")

    def test_hmac_signed_with_the_public_key_is_refused(
        self, auth_provider: AuthProvider, key_server: KeyServer, valid_claims: dict[str, Any]
    ) -> None:
        """The key-confusion attack: HS256 "signed" with the RSA public key everyone can fetch."""
        full = {"iss": key_server.issuer, "iat": int(time.time()), "exp": int(time.time()) + 300, **valid_claims}
        public_pem = key_server.keys["key-1"].as_pem(private=False)
        signing_input = f"{_b64({'alg': 'HS256', 'kid': 'key-1'})}.{_b64(full)}"
        mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
        self.refused(auth_provider, f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}")

    def test_a_wrong_signature_is_refused(
        self, auth_provider: AuthProvider, key_server: KeyServer, valid_claims: dict[str, Any]
    ) -> None:
        genuine = key_server.sign(valid_claims)
        promoted = key_server.sign({**valid_claims, "sub": "someone-else"})
        self.refused(auth_provider, promoted.rsplit(".", 1)[0] + "." + genuine.rsplit(".", 1)[1])
        # signed by a key the provider never published, under the published key's id
        self.refused(auth_provider, key_server.sign(valid_claims, kid="key-1", key_id="key-2"))

    def test_an_unknown_kid_is_refused(
        self, auth_provider: AuthProvider, key_server: KeyServer, valid_claims: dict[str, Any]
    ) -> None:
        self.refused(auth_provider, key_server.sign(valid_claims, kid="key-2"))

    def test_a_kid_of_the_wrong_key_type_is_refused(
        self, auth_provider: AuthProvider, key_server: KeyServer, valid_claims: dict[str, Any]
    ) -> None:
        # RS256 naming the EC key, and an ES256 token by that EC key (outside an RS256 allow-list)
        self.refused(auth_provider, key_server.sign(valid_claims, kid="ec-1", key_id="key-1"))
        self.refused(auth_provider, key_server.sign(valid_claims, kid="ec-1", alg="ES256"))

    @pytest.mark.parametrize("alg", ["RS384", "RS512", "PS256"])
    def test_an_algorithm_outside_the_allow_list_is_refused(
        self, auth_provider: AuthProvider, key_server: KeyServer, valid_claims: dict[str, Any], alg: str
    ) -> None:
        self.refused(auth_provider, key_server.sign(valid_claims, alg=alg))

    def test_critical_header_extensions_are_refused(
        self, auth_provider: AuthProvider, key_server: KeyServer, valid_claims: dict[str, Any]
    ) -> None:
        header = {"crit": ["x-must-understand"], "x-must-understand": True}
        self.refused(auth_provider, key_server.sign(valid_claims, header=header))

    @pytest.mark.parametrize("typ", ["at+jwt", "application/at+jwt", "AT+JWT"])
    def test_access_tokens_are_refused(
        self, auth_provider: AuthProvider, key_server: KeyServer, valid_claims: dict[str, Any], typ: str
    ) -> None:
        self.refused(auth_provider, key_server.sign(valid_claims, header={"typ": typ}))

    # -- claims --------------------------------------------------------------------------------------
    def test_a_wrong_or_missing_issuer_is_refused(
        self, auth_provider: AuthProvider, key_server: KeyServer, valid_claims: dict[str, Any]
    ) -> None:
        self.refused(auth_provider, key_server.sign({**valid_claims, "iss": "https://evil.example"}))
        self.refused(auth_provider, key_server.sign(valid_claims, omit=("iss",)))

    def test_a_wrong_or_missing_audience_is_refused(
        self, auth_provider: AuthProvider, key_server: KeyServer, valid_claims: dict[str, Any]
    ) -> None:
        self.refused(auth_provider, key_server.sign({**valid_claims, "aud": "another-client"}))
        self.refused(auth_provider, key_server.sign({k: v for k, v in valid_claims.items() if k != "aud"}))

    def test_several_audiences_without_our_client_as_azp_are_refused(
        self, auth_provider: AuthProvider, key_server: KeyServer, valid_claims: dict[str, Any], client_id: str
    ) -> None:
        audiences = [client_id, "other-api"]
        self.refused(auth_provider, key_server.sign({**valid_claims, "aud": audiences}))
        self.refused(auth_provider, key_server.sign({**valid_claims, "aud": audiences, "azp": "other-api"}))
        self.refused(auth_provider, key_server.sign({**valid_claims, "azp": "other-api"}))

    def test_an_expired_token_or_one_without_expiry_is_refused(
        self, auth_provider: AuthProvider, key_server: KeyServer, valid_claims: dict[str, Any]
    ) -> None:
        self.refused(auth_provider, key_server.sign({**valid_claims, "exp": int(time.time()) - 600}))
        self.refused(auth_provider, key_server.sign(valid_claims, omit=("exp",)))
        self.refused(auth_provider, key_server.sign({**valid_claims, "exp": "tomorrow"}))

    def test_a_token_from_the_future_is_refused(
        self, auth_provider: AuthProvider, key_server: KeyServer, valid_claims: dict[str, Any]
    ) -> None:
        later = int(time.time()) + 3600
        self.refused(auth_provider, key_server.sign({**valid_claims, "iat": later, "exp": later + 300}))
        self.refused(auth_provider, key_server.sign({**valid_claims, "nbf": later, "exp": later + 300}))

    @pytest.mark.parametrize("sub", [None, "", 42, {"id": "u-1"}, ["u-1"]])
    def test_a_missing_or_non_string_subject_is_refused(
        self, auth_provider: AuthProvider, key_server: KeyServer, valid_claims: dict[str, Any], sub: object
    ) -> None:
        claims = {k: v for k, v in valid_claims.items() if k != "sub"}
        if sub is not None:
            claims["sub"] = sub
        self.refused(auth_provider, key_server.sign(claims))

    def test_a_missing_or_wrong_nonce_is_refused(
        self, auth_provider: AuthProvider, key_server: KeyServer, valid_claims: dict[str, Any]
    ) -> None:
        self.refused(auth_provider, key_server.sign(valid_claims), nonce="n-1")
        self.refused(auth_provider, key_server.sign({**valid_claims, "nonce": "n-2"}), nonce="n-1")

    def test_an_unverified_email_never_makes_an_admin_nor_reaches_an_account(
        self, auth_provider: AuthProvider, key_server: KeyServer, valid_claims: dict[str, Any],
        claim_mapping: ClaimMapping,
    ) -> None:  # fmt: skip
        """An address in CMBCLUSTER_ADMIN_EMAILS that the provider does not vouch for (false in its
        declared claim, or no such claim; ``email_verified: true`` is no vouching unless that is the
        claim it declares): the provider refuses the token, or says the address is unverified, and
        then core's sign-in makes a plain user, never an admin, and never the existing account of
        that address."""
        from sqlalchemy import create_engine
        from sqlalchemy.orm import Session

        from cmbcluster.db.models import Base, User
        from cmbcluster.services.users import sign_in

        unverified = {**valid_claims, "email_verified": True, "sub": "u-unverified"}  # a decoy unless declared
        if claim_mapping.email_verified_claim is not None:
            unverified[claim_mapping.email_verified_claim] = False
        try:
            user_info = auth_provider.exchange_token(key_server.sign(unverified))
        except AuthenticationFailed:
            return  # refused outright: fine
        assert user_info.email_verified is False
        for existing in (
            User(email="first@example.org", auth_provider="x", subject="first", role="admin", email_verified=True),
            User(email=ADMIN_EMAIL, auth_provider="x", subject="owner", role="user", email_verified=True),
        ):
            engine = create_engine("sqlite://")
            Base.metadata.create_all(engine)
            try:
                with Session(engine) as db:
                    db.add(existing)
                    db.commit()
                    try:
                        user = sign_in(db, user_info, admin_emails=[ADMIN_EMAIL])
                    except CmbclusterError:
                        continue  # refused by core: fine
                    assert (user.role, user.subject) == ("user", "u-unverified"), "the unverified address granted this"
            finally:
                engine.dispose()
