"""The signed-in user's settings: environment variables, secret files and API tokens for scripts."""

from __future__ import annotations

import datetime as dt
from functools import partial
from typing import Annotated

from fastapi import Path, Request, Response
from pydantic import BaseModel, Field

from cmbcluster.api.deps import ApiRouter, Context, CurrentPrincipal, CurrentUser, DbSession, in_worker
from cmbcluster.api.guard import streams_body
from cmbcluster.bodies import RequestBody
from cmbcluster.context import AppContext
from cmbcluster.db.models import EnvVar
from cmbcluster.errors import InvalidRequest, PermissionDenied
from cmbcluster.services import sessions
from cmbcluster.services import user_settings as service
from cmbcluster.services.audit import audit

router = ApiRouter(prefix="/api/v1/settings", tags=["settings"])


# -- models --------------------------------------------------------------------------------------
class EnvVarOut(BaseModel):
    name: str
    value: str = Field(description="Empty when `unreadable`")
    unreadable: bool = Field(
        default=False, description="The stored value cannot be decrypted (the server's key changed): set it again"
    )
    updated_at: dt.datetime


class EnvVarIn(RequestBody):
    value: str = Field(description="At most 32 KiB (UTF-8), no NUL characters; may be empty")


class SecretFileOut(BaseModel):
    """A secret file as listed: never its content."""

    name: str
    size: int = Field(description="Size of the plaintext in bytes")
    updated_at: dt.datetime


class ApiTokenOut(BaseModel):
    id: str
    name: str
    display_prefix: str = Field(description="The token's first characters, to recognise it")
    created_at: dt.datetime
    expires_at: dt.datetime | None
    last_used_at: dt.datetime | None


class ApiTokenIn(RequestBody):
    name: str = Field(description="1 to 100 characters, to recognise the token later")
    expires_in_days: int | None = Field(default=None, ge=1, le=365, description="Omit for a token that never expires")


class ApiTokenCreated(BaseModel):
    id: str
    name: str
    token: str = Field(description="Shown this once only: send as 'Authorization: Bearer <token>'")
    expires_at: dt.datetime | None


EnvVarName = Annotated[str, Path(description="^[A-Za-z_][A-Za-z0-9_]*$, at most 128 characters, not reserved")]
SecretFileName = Annotated[str, Path(description="1 to 128 of A-Z a-z 0-9 . _ -, not '.', '..' or '..'-prefixed")]


# -- environment variables -----------------------------------------------------------------------
def env_var_out(row: EnvVar, context: AppContext) -> EnvVarOut:
    value = service.env_var_value(row, context.sealer(service.ENV_VAR_PURPOSE))
    return EnvVarOut(name=row.name, value=value or "", unreadable=value is None, updated_at=row.updated_at)


@router.get("/env-vars", response_model=list[EnvVarOut], summary="Your environment variables")
def list_env_vars(user: CurrentUser, db: DbSession, context: Context) -> list[EnvVarOut]:
    return [env_var_out(row, context) for row in service.list_env_vars(db, user.id)]


@router.put(
    "/env-vars/{name}",
    response_model=EnvVarOut,
    summary="Set an environment variable (create or replace); applied to environments at their next start",
    responses={400: {"description": "Invalid or reserved name, value too long or containing NUL"},
               409: {"description": "Too many environment variables"}},
)  # fmt: skip
def put_env_var(name: EnvVarName, body: EnvVarIn, user: CurrentUser, db: DbSession, context: Context) -> EnvVarOut:
    row, _ = service.set_env_var(db, user.id, name, body.value, sealer=context.sealer(service.ENV_VAR_PURPOSE))
    return env_var_out(row, context)


@router.delete("/env-vars/{name}", status_code=204, summary="Delete an environment variable")
def delete_env_var(name: str, user: CurrentUser, db: DbSession) -> Response:
    service.delete_env_var(db, user.id, name)
    return Response(status_code=204)


# -- secret files --------------------------------------------------------------------------------
@router.get(
    "/secret-files", response_model=list[SecretFileOut], summary="Your secret files (names and sizes, never content)"
)
def list_secret_files(user: CurrentUser, db: DbSession) -> list[SecretFileOut]:
    return [SecretFileOut.model_validate(row, from_attributes=True) for row in service.list_secret_files(db, user.id)]


@router.put(
    "/secret-files/{name}",
    response_model=SecretFileOut,
    summary="Upload a secret file (the raw request body); encrypted at rest, mounted with mode 0600",
    responses={
        201: {"description": "Created", "model": SecretFileOut},
        400: {"description": "Invalid file name, or an empty body"},
        409: {"description": "Too many secret files"},
        413: {"description": "Larger than CMBCLUSTER_MAX_SECRET_FILE_BYTES"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
@streams_body
async def put_secret_file(
    name: SecretFileName, request: Request, response: Response, user: CurrentUser, db: DbSession, context: Context
) -> SecretFileOut:
    service.validate_secret_file_name(name)
    limit = context.config.core.max_secret_file_bytes
    content = await _read_body(request, limit)
    if not content:
        raise InvalidRequest("the secret file is empty: send its content as the request body")
    row, created = await in_worker(db, partial(
        service.put_secret_file, db, user.id, name, content,
        sealer=context.sealer(service.SECRET_FILE_PURPOSE), max_bytes=limit,
    ))  # fmt: skip
    response.status_code = 201 if created else 200
    return SecretFileOut.model_validate(row, from_attributes=True)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, reading no more than ``limit`` + one chunk: 413 as soon as it is too large."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise service.too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise service.too_large(limit)
    return bytes(body)


@router.delete("/secret-files/{name}", status_code=204, summary="Delete a secret file")
def delete_secret_file(name: str, user: CurrentUser, db: DbSession) -> Response:
    service.delete_secret_file(db, user.id, name)
    return Response(status_code=204)


# -- API tokens ----------------------------------------------------------------------------------
@router.get("/tokens", response_model=list[ApiTokenOut], summary="Your API tokens (never the tokens themselves)")
def list_tokens(user: CurrentUser, db: DbSession) -> list[ApiTokenOut]:
    return [ApiTokenOut.model_validate(row, from_attributes=True) for row in sessions.list_api_tokens(db, user)]


@router.post(
    "/tokens",
    status_code=201,
    response_model=ApiTokenCreated,
    summary="Create an API token for scripts; the token is shown in this answer only",
)
def create_token(body: ApiTokenIn, principal: CurrentPrincipal, user: CurrentUser, db: DbSession) -> ApiTokenCreated:
    # Only a person signed in through a session mints tokens: a leaked token cannot breed
    # new ones that would survive its own revocation.
    if principal.session_id is None:
        raise PermissionDenied("API tokens can only be created from a signed-in session, not with another API token")
    row, token = sessions.create_api_token(db, user, name=body.name, expires_in_days=body.expires_in_days)
    audit(db, actor_id=user.id, action="api_token.created", target_type="api_token", target_id=row.id,
          name=row.name, expires_at=row.expires_at.isoformat() if row.expires_at else None)  # fmt: skip
    db.commit()
    return ApiTokenCreated(id=row.id, name=row.name, token=token, expires_at=row.expires_at)


@router.delete("/tokens/{token_id}", status_code=204, summary="Revoke an API token: it stops working at once")
def revoke_token(token_id: str, user: CurrentUser, db: DbSession, context: Context) -> Response:
    sessions.revoke_api_token(db, user, token_id)
    context.revocations.ended(sessions.TOKEN_ENDED, token_id=token_id)  # its open streams end now
    audit(db, actor_id=user.id, action="api_token.revoked", target_type="api_token", target_id=token_id)
    db.commit()
    return Response(status_code=204)
