"""User settings through the API: environment variables, encrypted secret files, API tokens."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from cmbcluster.compute.command import LaunchValues, standard_variables
from cmbcluster.context import AppContext
from cmbcluster.db.models import ApiToken, AuditEvent, EnvVar, SecretFile
from cmbcluster.security import Sealer
from cmbcluster.services import user_settings
from cmbcluster.services.catalog import JUPYTER_COMMAND

SETTINGS = "/api/v1/settings"
OCTETS = {"Content-Type": "application/octet-stream"}


@pytest.fixture
def context(app: FastAPI) -> AppContext:
    ctx: AppContext = app.state.context
    return ctx


@pytest.fixture
def db(context: AppContext, client: TestClient) -> Iterator[Session]:
    with context.sessions() as session:
        yield session


def user_id(client: TestClient, headers: dict[str, str]) -> str:
    user: str = client.get("/api/v1/auth/me", headers=headers).json()["id"]
    return user


def sealer(context: AppContext) -> Sealer:
    return context.sealer(user_settings.SECRET_FILE_PURPOSE)


def env_sealer(context: AppContext) -> Sealer:
    return context.sealer(user_settings.ENV_VAR_PURPOSE)


def at_start(db: Session, uid: str, context: AppContext) -> tuple[dict[str, str], dict[str, bytes]]:
    """The variables and secret files a start of the user's environments gets."""
    return user_settings.settings_at_start(db, uid, variables_sealer=env_sealer(context), files_sealer=sealer(context))


# -- environment variables -----------------------------------------------------------------------
def test_env_var_crud(client: TestClient, alice: dict[str, str], db: Session, context: AppContext) -> None:
    assert client.get(f"{SETTINGS}/env-vars", headers=alice).json() == []

    created = client.put(f"{SETTINGS}/env-vars/MY_VAR", json={"value": "one"}, headers=alice)
    assert created.status_code == 200, created.text
    assert created.json()["name"] == "MY_VAR" and created.json()["value"] == "one"
    first_update = dt.datetime.fromisoformat(created.json()["updated_at"])

    replaced = client.put(f"{SETTINGS}/env-vars/MY_VAR", json={"value": "two"}, headers=alice)
    assert replaced.status_code == 200 and replaced.json()["value"] == "two"
    assert dt.datetime.fromisoformat(replaced.json()["updated_at"]) >= first_update
    assert client.put(f"{SETTINGS}/env-vars/_other1", json={"value": ""}, headers=alice).status_code == 200

    listed = client.get(f"{SETTINGS}/env-vars", headers=alice).json()
    assert [(v["name"], v["value"]) for v in listed] == [("MY_VAR", "two"), ("_other1", "")]
    assert set(listed[0]) == {"name", "value", "unreadable", "updated_at"}
    assert at_start(db, user_id(client, alice), context)[0] == {
        "MY_VAR": "two",
        "_other1": "",
    }

    assert client.delete(f"{SETTINGS}/env-vars/MY_VAR", headers=alice).status_code == 204
    again = client.delete(f"{SETTINGS}/env-vars/MY_VAR", headers=alice)
    assert again.status_code == 404 and again.json()["error"] == "not_found"
    assert [v["name"] for v in client.get(f"{SETTINGS}/env-vars", headers=alice).json()] == ["_other1"]


@pytest.mark.parametrize("name", ["1ABC", "A-B", "A.B", "A%20B", "%C3%A9T%C3%A9", "A" * 129])
def test_invalid_env_var_names_are_refused(client: TestClient, alice: dict[str, str], name: str) -> None:
    answer = client.put(f"{SETTINGS}/env-vars/{name}", json={"value": "x"}, headers=alice)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "invalid_request"
    assert "environment variable name" in answer.json()["message"]
    assert client.get(f"{SETTINGS}/env-vars", headers=alice).json() == []


def test_longest_env_var_name_is_accepted(client: TestClient, alice: dict[str, str]) -> None:
    assert client.put(f"{SETTINGS}/env-vars/{'A' * 128}", json={"value": "x"}, headers=alice).status_code == 200


@pytest.mark.parametrize(
    "name",
    ["PATH", "HOME", "USER", "SHELL", "PWD", "HOSTNAME", "PORT", "HOST", "LD_PRELOAD", "LD_LIBRARY_PATH",
     "PYTHONPATH", "path", "CMBCLUSTER_SECRETS_DIR", "KUBERNETES_SERVICE_HOST", "BASH_ENV", "ENV", "PYTHONHOME",
     "LD_AUDIT"],
)  # fmt: skip
def test_reserved_env_var_names_are_refused_with_a_reason(client: TestClient, alice: dict[str, str], name: str) -> None:
    answer = client.put(f"{SETTINGS}/env-vars/{name}", json={"value": "x"}, headers=alice)
    assert answer.status_code == 400, answer.text
    message = answer.json()["message"]
    assert "reserved" in message and ":" in message  # says why
    assert client.get(f"{SETTINGS}/env-vars", headers=alice).json() == []


#: every variable a launch sets, JupyterLab's token variable included (a start with a port and a token)
LAUNCHED = standard_variables(
    LaunchValues(environment_id="e1", host="127.0.0.1", port=8888, base_url="/environments/e1/", token="t"),
    JUPYTER_COMMAND,
)


@pytest.mark.parametrize("name", [*sorted(LAUNCHED), "jupyter_token"])
def test_names_the_launch_sets_are_refused_saying_so(client: TestClient, alice: dict[str, str], name: str) -> None:
    """Accepted, they were silently replaced by the launch's own value (found by an outsider)."""
    answer = client.put(f"{SETTINGS}/env-vars/{name}", json={"value": "mine"}, headers=alice)
    assert answer.status_code == 400, answer.text
    assert "set by the application's launch" in answer.json()["message"]
    assert client.get(f"{SETTINGS}/env-vars", headers=alice).json() == []


@pytest.mark.parametrize(
    "name", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "aws_session_token", "GOOGLE_APPLICATION_CREDENTIALS",
             "GCE_METADATA_HOST"],
)  # fmt: skip
def test_cloud_credential_names_point_to_the_per_user_identity(
    client: TestClient, alice: dict[str, str], name: str
) -> None:
    answer = client.put(f"{SETTINGS}/env-vars/{name}", json={"value": "AKIA..."}, headers=alice)
    assert answer.status_code == 400
    assert "reserved" in answer.json()["message"] and "per-user cloud identity" in answer.json()["message"]


def test_validate_env_var_name_is_reusable() -> None:
    assert user_settings.validate_env_var_name("OMP_NUM_THREADS") == "OMP_NUM_THREADS"
    for bad in ("", "9X", "PATH", "AWS_REGION", "X" * 129):
        with pytest.raises(ValueError):  # InvalidRequest is a ValueError
            user_settings.validate_env_var_name(bad)


def test_env_var_value_limits(client: TestClient, alice: dict[str, str]) -> None:
    def put(value: object) -> int:
        status: int = client.put(f"{SETTINGS}/env-vars/V", json={"value": value}, headers=alice).status_code
        return status

    limit = user_settings.MAX_ENV_VAR_VALUE_BYTES
    assert put("x" * limit) == 200
    assert put("é" * (limit // 2)) == 200  # counted in UTF-8 bytes
    too_long = client.put(f"{SETTINGS}/env-vars/V", json={"value": "x" * (limit + 1)}, headers=alice)
    assert too_long.status_code == 400 and "32 KiB" in too_long.json()["message"]
    assert put("é" * (limit // 2) + "x") == 400
    nul = client.put(f"{SETTINGS}/env-vars/V", json={"value": "a\x00b"}, headers=alice)
    assert nul.status_code == 400 and "NUL" in nul.json()["message"]
    assert put(None) == 422
    assert client.put(f"{SETTINGS}/env-vars/V", json={}, headers=alice).status_code == 422
    assert client.put(f"{SETTINGS}/env-vars/V", json={"value": "a", "x": 1}, headers=alice).status_code == 422
    # the refused writes lost nothing
    assert client.get(f"{SETTINGS}/env-vars", headers=alice).json()[0]["value"] == "é" * (limit // 2)


def test_env_var_count_limit(client: TestClient, alice: dict[str, str], db: Session, context: AppContext) -> None:
    uid = user_id(client, alice)
    for i in range(user_settings.MAX_ENV_VARS_PER_USER):
        user_settings.set_env_var(db, uid, f"V{i}", "x", sealer=env_sealer(context))
    answer = client.put(f"{SETTINGS}/env-vars/ONE_MORE", json={"value": "x"}, headers=alice)
    assert answer.status_code == 409 and "100" in answer.json()["message"]
    assert client.put(f"{SETTINGS}/env-vars/V0", json={"value": "replaced"}, headers=alice).status_code == 200


def test_a_name_that_became_reserved_can_still_be_deleted_and_is_not_applied(
    client: TestClient, alice: dict[str, str], db: Session, context: AppContext
) -> None:
    uid = user_id(client, alice)
    db.add(EnvVar(user_id=uid, name="LD_PRELOAD", ciphertext=env_sealer(context).seal(b"/tmp/evil.so")))
    db.commit()
    assert at_start(db, uid, context)[0] == {}
    assert client.delete(f"{SETTINGS}/env-vars/LD_PRELOAD", headers=alice).status_code == 204


# -- secret files --------------------------------------------------------------------------------
def test_secret_file_round_trip_is_encrypted_and_never_returned(
    client: TestClient, alice: dict[str, str], context: AppContext, db: Session
) -> None:
    content = b"machine example.org login me password hunter2\n\x00\xff binary too"
    created = client.put(f"{SETTINGS}/secret-files/.netrc", content=content, headers=alice | OCTETS)
    assert created.status_code == 201, created.text
    assert set(created.json()) == {"name", "size", "updated_at"}
    assert created.json()["name"] == ".netrc" and created.json()["size"] == len(content)

    listed = client.get(f"{SETTINGS}/secret-files", headers=alice)
    assert listed.json() == [created.json()]
    for answer in (created, listed):
        assert b"hunter2" not in answer.content

    uid = user_id(client, alice)
    stored = db.execute(select(SecretFile).where(SecretFile.user_id == uid)).scalar_one()
    assert stored.ciphertext != content and b"hunter2" not in stored.ciphertext
    assert len(stored.ciphertext) == len(content) + 12 + 16  # nonce + GCM tag
    assert at_start(db, uid, context)[1] == {".netrc": content}

    replaced = client.put(f"{SETTINGS}/secret-files/.netrc", content=b"new", headers=alice | OCTETS)
    assert replaced.status_code == 200 and replaced.json()["size"] == 3
    db.expire_all()
    assert at_start(db, uid, context)[1] == {".netrc": b"new"}

    assert client.delete(f"{SETTINGS}/secret-files/.netrc", headers=alice).status_code == 204
    assert client.delete(f"{SETTINGS}/secret-files/.netrc", headers=alice).status_code == 404
    assert client.get(f"{SETTINGS}/secret-files", headers=alice).json() == []
    assert at_start(db, uid, context)[1] == {}

    actions = db.execute(
        select(AuditEvent.action, AuditEvent.detail).where(AuditEvent.target_type == "secret_file")
    ).all()
    assert [a for a, _ in actions] == ["secret_file.created", "secret_file.replaced", "secret_file.deleted"]
    assert all(d["name"] == ".netrc" and "hunter2" not in str(d) for _, d in actions)


def test_secret_file_without_content_type_and_empty(client: TestClient, alice: dict[str, str]) -> None:
    answer = client.put(f"{SETTINGS}/secret-files/plain.txt", content=b"x", headers=alice)
    assert answer.status_code == 201 and answer.json()["size"] == 1
    # the schema requires a body: an empty one is a mistake (a file picker that sent nothing)
    empty = client.put(f"{SETTINGS}/secret-files/empty.txt", content=b"", headers=alice)
    assert empty.status_code == 400 and "empty" in empty.json()["message"]
    assert [f["name"] for f in client.get(f"{SETTINGS}/secret-files", headers=alice).json()] == ["plain.txt"]


def test_tampered_secret_file_fails_to_decrypt_with_a_clear_error(
    client: TestClient, alice: dict[str, str], context: AppContext, db: Session
) -> None:
    client.put(f"{SETTINGS}/secret-files/key.pem", content=b"-----BEGIN KEY-----", headers=alice | OCTETS)
    uid = user_id(client, alice)
    row = db.execute(select(SecretFile).where(SecretFile.user_id == uid)).scalar_one()
    tampered = bytearray(row.ciphertext)
    tampered[20] ^= 0x01
    row.ciphertext = bytes(tampered)
    db.commit()
    with pytest.raises(user_settings.SecretFileUnreadable, match=r"'key\.pem' cannot be decrypted.*tampered"):
        at_start(db, uid, context)[1]
    # sealed with another key (the server's secret key changed): the same clear error
    row.ciphertext = Sealer(b"another key" * 4, user_settings.SECRET_FILE_PURPOSE).seal(b"-----BEGIN KEY-----")
    db.commit()
    with pytest.raises(user_settings.SecretFileUnreadable, match="secret key"):
        at_start(db, uid, context)[1]
    assert user_settings.SecretFileUnreadable.http_status == 409


def test_secret_file_size_limit(client: TestClient, alice: dict[str, str], context: AppContext) -> None:
    limit = context.config.core.max_secret_file_bytes
    assert client.put(f"{SETTINGS}/secret-files/big", content=b"x" * limit, headers=alice | OCTETS).status_code == 201
    too_big = client.put(f"{SETTINGS}/secret-files/big", content=b"y" * (limit + 1), headers=alice | OCTETS)
    assert too_big.status_code == 413 and too_big.json()["error"] == "payload_too_large"
    assert str(limit) in too_big.json()["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server stops reading past the limit
        for _ in range(limit // 1000 + 2):
            yield b"z" * 1000

    streamed = client.put(f"{SETTINGS}/secret-files/big", content=chunks(), headers=alice | OCTETS)
    assert streamed.status_code == 413
    listed = client.get(f"{SETTINGS}/secret-files", headers=alice).json()
    assert [(f["name"], f["size"]) for f in listed] == [("big", limit)]  # the first upload is kept


@pytest.mark.parametrize("name", ["%2E%2E", "%2E", "..hidden", "a%20b", "sp%C3%A9cial", "a:b", "x" * 129])
def test_bad_secret_file_names_are_refused(client: TestClient, alice: dict[str, str], name: str) -> None:
    answer = client.put(f"{SETTINGS}/secret-files/{name}", content=b"data", headers=alice | OCTETS)
    assert answer.status_code == 400, answer.text
    assert "secret file name" in answer.json()["message"]
    assert client.get(f"{SETTINGS}/secret-files", headers=alice).json() == []


def test_a_slash_never_reaches_a_secret_file_name(client: TestClient, alice: dict[str, str]) -> None:
    answer = client.put(f"{SETTINGS}/secret-files/a%2F..%2Fb", content=b"data", headers=alice | OCTETS)
    assert answer.status_code == 404  # no route matches: the name never contains a slash
    assert client.get(f"{SETTINGS}/secret-files", headers=alice).json() == []


def test_secret_file_count_limit(client: TestClient, alice: dict[str, str], context: AppContext, db: Session) -> None:
    uid = user_id(client, alice)
    for i in range(user_settings.MAX_SECRET_FILES_PER_USER):
        user_settings.put_secret_file(db, uid, f"f{i}", b"x", sealer=sealer(context), max_bytes=10)
    answer = client.put(f"{SETTINGS}/secret-files/one-more", content=b"x", headers=alice | OCTETS)
    assert answer.status_code == 409 and "20" in answer.json()["message"]
    assert client.put(f"{SETTINGS}/secret-files/f0", content=b"y", headers=alice | OCTETS).status_code == 200


# -- API tokens ----------------------------------------------------------------------------------
def test_api_token_lifecycle(client: TestClient, alice: dict[str, str], db: Session) -> None:
    created = client.post(f"{SETTINGS}/tokens", json={"name": "my laptop"}, headers=alice)
    assert created.status_code == 201, created.text
    body = created.json()
    assert set(body) == {"id", "name", "token", "expires_at"}
    token = body["token"]
    assert token.startswith("cmbt_") and body["name"] == "my laptop" and body["expires_at"] is None

    bearer = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/auth/me", headers=bearer).json()["email"] == "alice@example.org"

    listed = client.get(f"{SETTINGS}/tokens", headers=alice)
    assert [t["id"] for t in listed.json()] == [body["id"]]
    assert set(listed.json()[0]) == {"id", "name", "display_prefix", "created_at", "expires_at", "last_used_at"}
    assert token not in listed.text and token[12:] not in listed.text
    assert token.startswith(listed.json()[0]["display_prefix"])
    assert listed.json()[0]["last_used_at"] is not None  # it was just used

    row = db.get(ApiToken, body["id"])
    assert row is not None and row.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert token not in {str(getattr(row, column.key)) for column in ApiToken.__table__.columns}

    assert client.delete(f"{SETTINGS}/tokens/{body['id']}", headers=alice).status_code == 204
    refused = client.get("/api/v1/auth/me", headers=bearer)
    assert refused.status_code == 401 and refused.json()["error"] == "authentication_failed"
    assert client.get(f"{SETTINGS}/tokens", headers=alice).json() == []
    assert client.delete(f"{SETTINGS}/tokens/{body['id']}", headers=alice).status_code == 404

    actions = db.execute(select(AuditEvent.action).where(AuditEvent.target_id == body["id"])).scalars().all()
    assert list(actions) == ["api_token.created", "api_token.revoked"]
    details = db.execute(select(AuditEvent.detail).where(AuditEvent.target_type == "api_token")).scalars().all()
    assert token not in str(details)


def test_api_token_expiry(client: TestClient, alice: dict[str, str], db: Session) -> None:
    body = client.post(f"{SETTINGS}/tokens", json={"name": "ci", "expires_in_days": 30}, headers=alice).json()
    expires = dt.datetime.fromisoformat(body["expires_at"])
    assert abs(expires - (dt.datetime.now(dt.UTC) + dt.timedelta(days=30))) < dt.timedelta(minutes=1)
    bearer = {"Authorization": f"Bearer {body['token']}"}
    assert client.get("/api/v1/auth/me", headers=bearer).status_code == 200

    row = db.get(ApiToken, body["id"])
    assert row is not None
    row.expires_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    db.commit()
    assert client.get("/api/v1/auth/me", headers=bearer).status_code == 401


@pytest.mark.parametrize("payload", [{"name": "t", "expires_in_days": 0}, {"name": "t", "expires_in_days": 366},
                                     {"name": "t", "expires_in_days": "soon"}, {}])  # fmt: skip
def test_api_token_bad_expiry_is_422(client: TestClient, alice: dict[str, str], payload: object) -> None:
    assert client.post(f"{SETTINGS}/tokens", json=payload, headers=alice).status_code == 422


@pytest.mark.parametrize("name", ["", "   ", "x" * 101])
def test_api_token_bad_name_is_400(client: TestClient, alice: dict[str, str], name: str) -> None:
    answer = client.post(f"{SETTINGS}/tokens", json={"name": name}, headers=alice)
    assert answer.status_code == 400 and "token name" in answer.json()["message"]


# -- isolation and authentication ----------------------------------------------------------------
def test_users_cannot_see_or_touch_each_others_settings(
    client: TestClient, alice: dict[str, str], bob: dict[str, str], context: AppContext, db: Session
) -> None:
    client.put(f"{SETTINGS}/env-vars/SHARED_NAME", json={"value": "alice's"}, headers=alice)
    client.put(f"{SETTINGS}/secret-files/id_rsa", content=b"alice's key", headers=alice | OCTETS)
    token = client.post(f"{SETTINGS}/tokens", json={"name": "alice's"}, headers=alice).json()

    for what in ("env-vars", "secret-files", "tokens"):
        assert client.get(f"{SETTINGS}/{what}", headers=bob).json() == []
    assert client.delete(f"{SETTINGS}/env-vars/SHARED_NAME", headers=bob).status_code == 404
    assert client.delete(f"{SETTINGS}/secret-files/id_rsa", headers=bob).status_code == 404
    other = client.delete(f"{SETTINGS}/tokens/{token['id']}", headers=bob)
    assert other.status_code == 404 and other.json()["error"] == "not_found"

    # bob's own variable of the same name is his own
    assert client.put(f"{SETTINGS}/env-vars/SHARED_NAME", json={"value": "bob's"}, headers=bob).status_code == 200
    assert client.put(f"{SETTINGS}/secret-files/id_rsa", content=b"bob's", headers=bob | OCTETS).status_code == 201

    alice_id, bob_id = user_id(client, alice), user_id(client, bob)
    assert at_start(db, alice_id, context)[0] == {"SHARED_NAME": "alice's"}
    assert at_start(db, bob_id, context)[0] == {"SHARED_NAME": "bob's"}
    assert at_start(db, alice_id, context)[1] == {"id_rsa": b"alice's key"}
    assert at_start(db, bob_id, context)[1] == {"id_rsa": b"bob's"}
    assert client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token['token']}"}).status_code == 200
    assert len(client.get(f"{SETTINGS}/tokens", headers=alice).json()) == 1


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/env-vars"), ("PUT", "/env-vars/X"), ("DELETE", "/env-vars/X"), ("GET", "/secret-files"),
     ("PUT", "/secret-files/x"), ("DELETE", "/secret-files/x"), ("GET", "/tokens"), ("POST", "/tokens"),
     ("DELETE", "/tokens/abc")],
)  # fmt: skip
def test_every_route_needs_sign_in(client: TestClient, method: str, path: str) -> None:
    assert client.request(method, SETTINGS + path, json={"value": "x", "name": "x"}).status_code == 401


def test_every_settings_route_is_documented(client: TestClient) -> None:
    paths = client.get("/api/v1/openapi.json").json()["paths"]
    operations = [op for path, ops in paths.items() if path.startswith(SETTINGS) for op in ops.values()]
    assert len(operations) == 9
    assert all(op.get("summary") for op in operations)
    upload = paths[f"{SETTINGS}/secret-files/{{name}}"]["put"]
    assert "application/octet-stream" in upload["requestBody"]["content"]


def test_api_tokens_cannot_mint_more_tokens(client: TestClient, alice: dict[str, str]) -> None:
    created = client.post("/api/v1/settings/tokens", headers=alice, json={"name": "ci"})
    assert created.status_code == 201
    token_headers = {"Authorization": f"Bearer {created.json()['token']}"}
    refused = client.post("/api/v1/settings/tokens", headers=token_headers, json={"name": "sneaky"})
    assert refused.status_code == 403
    assert "signed-in session" in refused.json()["message"]


def test_signing_out_with_an_api_token_says_how_to_stop_it(client: TestClient, alice: dict[str, str]) -> None:
    """Sign-out ends a session; it answered 204 to an API token, which went on working (found by an
    outsider): a script that "signs out" a leaked token must learn that it did not stop it."""
    created = client.post(f"{SETTINGS}/tokens", headers=alice, json={"name": "ci"}).json()
    token_headers = {"Authorization": f"Bearer {created['token']}"}
    refused = client.post("/api/v1/auth/logout", headers=token_headers)
    assert refused.status_code == 400, refused.text
    assert f"/api/v1/settings/tokens/{created['id']}" in refused.json()["message"]
    assert client.get("/api/v1/auth/me", headers=token_headers).status_code == 200  # untouched, as it says
    assert client.post("/api/v1/auth/logout", headers=alice).status_code == 204  # a session signs out
