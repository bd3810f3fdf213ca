"""A generic OpenID Connect identity provider: discovery, code flow with PKCE, token validation.

Import it from :mod:`cmbcluster.oidc`, the public module (this one is its implementation).
Validation follows the security rules: an algorithm allow-list (never ``none`` or an HMAC
algorithm with a public key), the issuer, the audience and ``azp``, expiry with a small skew, a
string ``sub``, the nonce, ID tokens only, and a JWKS that is cached and refreshed when a token
names an unknown ``kid``. A plugin adds what its issuer needs by configuration
(:class:`OidcConfig`: ``required_claims`` such as a tenant ``tid``, which claims hold the e-mail,
name, groups and roles, which groups or roles make an admin) or by overriding
:meth:`OidcProvider.check_claims` and :meth:`OidcProvider.user_info`; never by re-implementing
verification.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard
from urllib.parse import urlencode

import httpx
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from cmbcluster.errors import AuthenticationFailed, ProviderUnavailable
from cmbcluster.interfaces import AuthorizationRequest, AuthProvider, TokenSet, UserInfo

ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


@dataclass(frozen=True, kw_only=True)
class OidcConfig:
    """Everything a provider needs; plugins fill it from their own settings."""

    name: str
    issuer: str
    client_id: str
    client_secret: str | None = None
    display_name: str = "Single sign-on"
    scopes: tuple[str, ...] = ("openid", "email", "profile")
    discovery_url: str | None = None  # default: <issuer>/.well-known/openid-configuration
    jwks_url: str | None = None  # default: from discovery
    accepted_issuers: tuple[str, ...] = ()  # default: (issuer,)
    audience: str | None = None  # default: client_id
    algorithms: tuple[str, ...] = ("RS256",)
    leeway_seconds: int = 60
    #: Claims every token must carry with one of the listed values, checked after the standard
    #: ones: e.g. ``{"tid": ("<tenant id>",)}`` so that a multi-tenant issuer admits one tenant.
    required_claims: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: Which claims hold the person's address, name, groups and roles (issuers differ: Entra ID
    #: sends app roles in ``roles`` and may send the address only as ``preferred_username``).
    email_claim: str = "email"
    name_claim: str = "name"
    groups_claim: str = "groups"
    roles_claim: str = "roles"
    #: A member of any of these groups, or holder of any of these roles, is a CMBCluster admin.
    admin_groups: tuple[str, ...] = ("admin", "admins", "cmbcluster-admins")
    admin_roles: tuple[str, ...] = ()
    timeout_seconds: float = 10.0
    extra_authorize_params: dict[str, str] = field(default_factory=dict)
    #: The claim in which the issuer vouches for the address in ``email_claim`` (true, or the string
    #: "true"): ``email_verified`` in OpenID Connect. Entra ID sends none by default; its optional
    #: claim ``xms_edov`` (the e-mail's domain owner verified) says so for ``email``. None: the issuer
    #: never vouches, and its addresses grant nothing. Only a verified address grants admin through
    #: CMBCLUSTER_ADMIN_EMAILS, links a sign-in to an existing account or becomes an account's address.
    email_verified_claim: str | None = "email_verified"
    #: Refuse sign-in with an address the provider does not vouch for. Off for issuers whose tokens
    #: may carry an unverified address (or never vouch): the person signs in, the address grants nothing.
    require_verified_email: bool = True

    def __post_init__(self) -> None:
        bad = [alg for alg in self.algorithms if alg not in ASYMMETRIC_ALGORITHMS]
        if bad:
            raise ValueError(f"only asymmetric signature algorithms are accepted, not {', '.join(bad)}")
        empty = [name for name, values in self.required_claims.items() if isinstance(values, str) or not values]  # type: ignore[unreachable]
        if empty:  # a bare string would be matched letter by letter; no value would admit nobody
            raise ValueError(f"required_claims needs a tuple of accepted values for {', '.join(empty)}")
        if self.require_verified_email and self.email_verified_claim is None:
            raise ValueError(
                "require_verified_email needs an email_verified_claim: an issuer that never vouches for addresses "
                "would refuse everyone with one (set require_verified_email=False: its addresses then grant nothing)"
            )


class JwksCache:
    """The provider's signing keys; refetched when a token names an unknown key (at most every
    ``min_refresh_seconds``, so forged ``kid`` values cannot make us hammer the provider)."""

    def __init__(self, url_source: Any, http: httpx.Client, *, min_refresh_seconds: float = 30.0) -> None:
        self._url_source = url_source  # a callable giving the JWKS URL (it may need discovery first)
        self._http = http
        self._keys: KeySet | None = None
        self._fetched_at = 0.0
        self._min_refresh = min_refresh_seconds
        self._lock = threading.Lock()

    def key_for(self, kid: str | None) -> Any:
        keys = self._get(refresh=False)
        key = _pick(keys, kid)
        if key is None and time.monotonic() - self._fetched_at >= self._min_refresh:
            key = _pick(self._get(refresh=True), kid)
        if key is None:
            raise AuthenticationFailed(f"token signed with an unknown key {kid!r}")
        return key

    def refresh(self) -> None:
        """Fetch the keys now (readiness checks); ProviderUnavailable when they cannot be had."""
        self._get(refresh=True)

    def _get(self, *, refresh: bool) -> KeySet:
        with self._lock:
            if self._keys is None or refresh:
                data = _get_json(self._http, self._url_source(), "JWKS")
                try:
                    self._keys = KeySet.import_key_set(data)  # type: ignore[arg-type]  # validated by joserfc
                except (JoseError, ValueError, KeyError, TypeError) as exc:
                    raise ProviderUnavailable(f"the identity provider's JWKS is invalid: {exc}") from None
                self._fetched_at = time.monotonic()
            return self._keys


def _pick(keys: KeySet, kid: str | None) -> Any:
    if kid is None:
        # Some providers sign without a kid; that is unambiguous only with a single signing key.
        signing = [k for k in keys.keys if k.get("use") in (None, "sig")]
        return signing[0] if len(signing) == 1 else None
    return next((k for k in keys.keys if k.kid == kid), None)


def _is_number(value: object) -> TypeGuard[float]:
    """A finite JSON number (Python's JSON reader also takes NaN and Infinity: never a time)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def email_verified(claims: dict[str, Any], claim: str | None = "email_verified") -> bool:
    """Whether the provider vouches for the token's address in ``claim`` (some send it as a string;
    None: it never vouches)."""
    verified = claims.get(claim) if claim is not None else None
    return verified is True or verified == "true"


def _is_access_token_type(typ: object) -> bool:
    """``at+jwt`` (RFC 9068), with or without the ``application/`` prefix, in any case."""
    return isinstance(typ, str) and typ.lower().removeprefix("application/") == "at+jwt"


def _get_json(http: httpx.Client, url: str, what: str) -> dict[str, Any]:
    try:
        response = http.get(url)
        response.raise_for_status()
        data = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise ProviderUnavailable(f"cannot fetch the identity provider's {what} from {url}: {exc}") from None
    if not isinstance(data, dict):
        raise ProviderUnavailable(f"the identity provider's {what} at {url} is not a JSON object")
    return data


class OidcProvider(AuthProvider):
    """An :class:`~cmbcluster.interfaces.AuthProvider` for any OpenID Connect issuer.

    Stable for subclasses (plugin API 1.x): the constructor, :attr:`config`, :meth:`check_claims`
    (extra checks, after every standard one passed; raise AuthenticationFailed), :meth:`user_info`
    (claims to a :class:`~cmbcluster.interfaces.UserInfo`; call ``super()`` and adjust),
    :meth:`check_audience`, :meth:`metadata` and :meth:`close`. Everything named with ``_`` is not.
    """

    def __init__(self, config: OidcConfig, *, http: httpx.Client | None = None) -> None:
        self.config = config
        self.display_name = config.display_name
        # Retries cover connection failures only: never repeat a token request blindly.
        self._owns_http = http is None  # a client handed in is its owner's to close
        self._http = http or httpx.Client(
            timeout=config.timeout_seconds, transport=httpx.HTTPTransport(retries=2), follow_redirects=False
        )
        self._metadata: dict[str, Any] | None = None
        self._metadata_lock = threading.Lock()
        self.jwks = JwksCache(self._jwks_url, self._http)

    def close(self) -> None:
        """Close the HTTP client this provider made (never one it was given)."""
        if self._owns_http:
            self._http.close()

    # -- discovery -------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        with self._metadata_lock:
            if self._metadata is None:
                url = self.config.discovery_url or self.config.issuer.rstrip("/") + "/.well-known/openid-configuration"
                self._metadata = _get_json(self._http, url, "discovery document")
            return self._metadata

    def _endpoint(self, name: str) -> str:
        value = self.metadata().get(name)
        if not isinstance(value, str):
            raise ProviderUnavailable(f"the identity provider's discovery document has no {name}")
        return value

    def _jwks_url(self) -> str:
        return self.config.jwks_url or self._endpoint("jwks_uri")

    def check_ready(self) -> None:
        self.metadata()

    # -- the code flow -----------------------------------------------------------------------------
    def authorization_url(self, request: AuthorizationRequest) -> str:
        params = {
            "response_type": "code",
            "client_id": self.config.client_id,
            "redirect_uri": request.redirect_uri,
            "scope": " ".join(self.config.scopes),
            "state": request.state,
            "nonce": request.nonce,
            "code_challenge": request.code_challenge,
            "code_challenge_method": request.code_challenge_method,
            **self.config.extra_authorize_params,
        }
        return f"{self._endpoint('authorization_endpoint')}?{urlencode(params)}"

    def exchange_code(self, code: str, *, redirect_uri: str, code_verifier: str) -> TokenSet:
        return self._token_request(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect_uri,
                "code_verifier": code_verifier,
            }
        )

    def refresh(self, refresh_token: str) -> TokenSet:
        return self._token_request({"grant_type": "refresh_token", "refresh_token": refresh_token})

    def _token_request(self, form: dict[str, str]) -> TokenSet:
        kwargs: dict[str, Any] = {}
        if self.config.client_secret:  # client_secret_basic
            kwargs["auth"] = httpx.BasicAuth(self.config.client_id, self.config.client_secret)
        else:  # a public client identifies itself in the form
            form = {**form, "client_id": self.config.client_id}
        try:
            response = self._http.post(self._endpoint("token_endpoint"), data=form, **kwargs)
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"the identity provider's token endpoint did not answer: {exc}") from None
        if response.status_code >= 500:
            raise ProviderUnavailable(f"the identity provider's token endpoint failed ({response.status_code})")
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code != 200:
            reason = body.get("error_description") or body.get("error") or f"HTTP {response.status_code}"
            raise AuthenticationFailed(f"the identity provider refused the sign-in: {reason}")
        return TokenSet(
            id_token=body.get("id_token"),
            access_token=body.get("access_token"),
            refresh_token=body.get("refresh_token"),
            expires_in=body.get("expires_in"),
        )

    # -- validation --------------------------------------------------------------------------------
    def validate_token(self, token: str, *, nonce: str | None = None) -> dict[str, Any]:
        try:
            header = jws.extract_compact(token.encode()).protected
        except (JoseError, ValueError, UnicodeError, RecursionError):
            raise AuthenticationFailed("malformed token") from None
        alg = header.get("alg")
        if alg not in self.config.algorithms:
            raise AuthenticationFailed(f"token algorithm {alg!r} is not accepted")
        if "crit" in header:  # ID tokens need no critical extensions; an unknown one must be refused
            raise AuthenticationFailed("tokens with critical header extensions are not accepted")
        if _is_access_token_type(header.get("typ")):
            raise AuthenticationFailed("an access token is not an ID token: send the ID token")
        key = self.jwks.key_for(header.get("kid"))
        try:
            claims = dict(jwt.decode(token, key, algorithms=list(self.config.algorithms)).claims)
        except RecursionError:
            raise AuthenticationFailed("malformed token: nested too deeply") from None
        except (JoseError, ValueError) as exc:
            raise AuthenticationFailed(f"invalid token signature: {exc}") from None
        self._check_standard_claims(claims, nonce)
        self.check_claims(claims)
        return claims

    def _check_standard_claims(self, claims: dict[str, Any], nonce: str | None) -> None:
        now = time.time()
        leeway = self.config.leeway_seconds
        issuers = self.config.accepted_issuers or (self.config.issuer,)
        if claims.get("iss") not in issuers:
            raise AuthenticationFailed(f"token issuer {claims.get('iss')!r} is not accepted")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub.strip() or len(sub) > 255:
            raise AuthenticationFailed("token has no valid subject ('sub' must be a non-empty string)")
        exp = claims.get("exp")
        if not _is_number(exp) or exp + leeway < now:
            raise AuthenticationFailed("token expired" if _is_number(exp) else "token has no valid expiry ('exp')")
        for name in ("iat", "nbf"):
            value = claims.get(name)
            if value is None:
                continue
            if not _is_number(value):
                raise AuthenticationFailed(f"token claim {name!r} is not a time")
            if value - leeway > now:
                raise AuthenticationFailed(
                    "token issued in the future" if name == "iat" else "token is not valid yet ('nbf' in the future)"
                )
        if nonce is not None and claims.get("nonce") != nonce:
            raise AuthenticationFailed("token nonce does not match this sign-in")
        self.check_audience(claims)
        for name, accepted in self.config.required_claims.items():
            if claims.get(name) not in accepted:
                raise AuthenticationFailed(f"token claim {name!r} is not one this deployment accepts")
        verified = email_verified(claims, self.config.email_verified_claim)
        if self.config.require_verified_email and claims.get(self.config.email_claim) and not verified:
            raise AuthenticationFailed(
                "the identity provider has not verified this e-mail address; verify it there, then sign in again"
            )

    def check_audience(self, claims: dict[str, Any]) -> None:
        """``aud`` must contain our client id; with several audiences, ``azp`` must be our client id
        (OpenID Connect Core 3.1.3.7), and an ``azp`` naming another client is refused."""
        audience = self.config.audience or self.config.client_id
        aud = claims.get("aud")
        audiences = aud if isinstance(aud, list) else [aud]
        if audience not in audiences:
            raise AuthenticationFailed("token audience is not this application")
        azp = claims.get("azp")
        if (len(audiences) > 1 and azp != self.config.client_id) or (azp is not None and azp != self.config.client_id):
            raise AuthenticationFailed("token was issued to another client ('azp' is not this application)")

    def check_claims(self, claims: dict[str, Any]) -> None:
        """Provider-specific checks (email_verified, hosted domain, token_use...). Raise AuthenticationFailed."""

    def user_info(self, claims: dict[str, Any]) -> UserInfo:
        """The person the validated ``claims`` describe, with CMBCluster's roles (``admin`` from the
        configured admin groups or roles)."""
        groups, roles = _strings(claims.get(self.config.groups_claim)), _strings(claims.get(self.config.roles_claim))
        is_admin = set(groups) & set(self.config.admin_groups) or set(roles) & set(self.config.admin_roles)
        return UserInfo(
            provider=self.config.name,
            subject=str(claims["sub"]),
            email=str(claims.get(self.config.email_claim) or ""),
            email_verified=email_verified(claims, self.config.email_verified_claim),
            name=str(claims.get(self.config.name_claim) or ""),
            picture=str(claims.get("picture") or ""),
            groups=groups,
            roles=("admin",) if is_admin else (),
            claims=claims,
        )


def _strings(value: object) -> tuple[str, ...]:
    """A list claim as strings (one string is a list of one: some issuers send a lone group so)."""
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value) if isinstance(value, list) else ()
