"""Real OpenID Connect servers on loopback for tests of auth providers.

- :class:`OidcMockServer` runs ``oidc-provider-mock`` (a full provider: discovery, authorize
  form, token, JWKS) in a subprocess, for end-to-end sign-in flows.
- :class:`KeyServer` is a tiny HTTP server whose signing keys the test controls, to send
  providers hand-made (and tampered) tokens: wrong algorithm, audience, issuer, expiry, key.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from joserfc import jws
from joserfc.jwk import ECKey, RSAKey
from joserfc.jws import JWSRegistry
from joserfc.registry import HeaderParameter

from cmbcluster.testing.process import BackgroundProcess, first_answer, free_port


class OidcMockServer(BackgroundProcess):
    """``oidc-provider-mock`` on a free loopback port; any client id and secret are accepted."""

    def __init__(self, *, python: str = sys.executable) -> None:
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        script = Path(python).with_name("oidc-provider-mock")
        command = [str(script)] if script.exists() else [python, "-m", "oidc_provider_mock"]
        self.process = subprocess.Popen(
            [*command, "-H", "127.0.0.1", "-p", str(self.port), "--require-nonce", "true"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        discovery = first_answer(f"{self.issuer}/.well-known/openid-configuration", self.process, 20, request_timeout=1)
        if discovery is not None and discovery.status_code == 200:
            return
        if self.process.poll() is not None:
            raise RuntimeError(
                f"oidc-provider-mock exited: {self.process.stderr.read().decode() if self.process.stderr else ''}"
            )
        self.stop()
        raise RuntimeError("oidc-provider-mock did not start within 20 s")

    def put_user(self, sub: str, claims: dict[str, Any]) -> None:
        """Set the claims the provider puts in ``sub``'s tokens (email, email_verified, name, groups...)."""
        httpx.put(f"{self.issuer}/users/{sub}", json=claims, timeout=5).raise_for_status()

    def authorize(self, authorization_url: str, sub: str) -> str:
        """Submit the provider's sign-in form as ``sub``; returns the callback URL it redirects to."""
        response = httpx.post(authorization_url, data={"sub": sub}, follow_redirects=False, timeout=5)
        if response.status_code not in (302, 303):
            raise AssertionError(f"the provider did not redirect: {response.status_code} {response.text[:300]}")
        return response.headers["location"]


class KeyServer:
    """Serves a discovery document and a JWKS for keys the test holds, and signs tokens with them.

    ``kids`` are RSA keys (RS256); ``ec_kids`` are P-256 keys (ES256), published the same way,
    for tests that send a key of the wrong type. ``published`` says which the JWKS lists.
    """

    def __init__(
        self, *, issuer: str | None = None, kids: tuple[str, ...] = ("key-1",), ec_kids: tuple[str, ...] = ()
    ) -> None:
        self.keys: dict[str, RSAKey | ECKey] = {
            # no "alg" on the keys themselves, so a test can sign with any algorithm of their type
            kid: RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig"})
            for kid in kids
        }
        self.keys.update({kid: ECKey.generate_key("P-256", parameters={"kid": kid, "use": "sig"}) for kid in ec_kids})
        self.published = set(kids) | set(ec_kids)
        self.jwks_requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                body: dict[str, object]
                if path.endswith("/.well-known/openid-configuration"):
                    body = {
                        "issuer": server.issuer, "jwks_uri": f"{server.url}/jwks",
                        "authorization_endpoint": f"{server.url}/authorize", "token_endpoint": f"{server.url}/token",
                    }  # fmt: skip
                elif path == "/jwks":
                    server.jwks_requests += 1
                    body = {
                        "keys": [k.as_dict(private=False) for kid, k in server.keys.items() if kid in server.published]
                    }
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self.issuer = issuer or self.url
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def sign(
        self,
        claims: dict[str, Any],
        *,
        kid: str | None = "key-1",
        header: dict[str, Any] | None = None,
        alg: str = "RS256",
        key_id: str | None = None,
        omit: tuple[str, ...] = (),
    ) -> str:
        """A token over ``claims``: ``iss``/``iat``/``exp`` filled in unless given, ``omit`` removed.

        Signed with ``alg`` by the key ``key_id`` (default: ``kid``'s), so a test can sign with one
        key and name another in the header; ``header`` entries are added as given (``typ``,
        ``crit``...), whether or not a JOSE library would write them.
        """
        now = int(time.time())
        full = {"iss": self.issuer, "iat": now, "exp": now + 300, **claims}
        for name in omit:
            full.pop(name, None)
        key = self.keys[key_id or kid or next(iter(self.keys))]
        hdr: dict[str, Any] = {"alg": alg, **({"kid": kid} if kid else {}), **(header or {})}
        # Any extra header a test adds is declared, so that even `crit` naming it is written.
        registry = JWSRegistry(
            header_registry={name: HeaderParameter(name, _anything) for name in hdr},
            algorithms=[alg],
            strict_check_header=False,
        )
        return jws.serialize_compact(hdr, json.dumps(full).encode(), key, algorithms=[alg], registry=registry)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> KeyServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _anything(value: object) -> None:
    """A header validator that accepts any value: tests write headers a library would refuse."""
