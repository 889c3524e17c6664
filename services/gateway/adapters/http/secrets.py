"""The caller's secrets (`/v1/secrets`) and their org's (`/v1/org/secrets`, set by admins).

Names and values are checked by the secrets service; this only forwards, scoped to the
caller: a user addresses their own secrets by name, so another user's name is a plain 404.
"""

from typing import Any

from litestar import Controller, Request, delete, get, put
from litestar.status_codes import HTTP_204_NO_CONTENT

from contracts.commands import secrets as cmd
from contracts.commands.common import Empty
from services.gateway.adapters.http.context import admin, caller, gateway_of, meta
from services.gateway.adapters.http.schemas import SecretInfo, SecretValue
from services.gateway.domain import Principal


def _info(s: cmd.SecretView) -> SecretInfo:
    return SecretInfo(
        name=s.name,
        scope=s.scope,
        fingerprint=s.fingerprint,
        key_id=s.key_id,
        created_at=s.created_at,
        updated_at=s.updated_at,
        last_used_at=s.last_used_at,
    )


async def _put(
    request: Request[Any, Any, Any], p: Principal, scope: cmd.Scope, name: str, value: str
) -> SecretInfo:
    stored = await gateway_of(request).client.call(
        "secrets",
        "put",
        cmd.PutSecret(
            meta=meta(request), org_id=p.org_id, user_id=p.user_id, scope=scope, name=name, value=value
        ),
        cmd.SecretView,
    )
    return _info(stored)


async def _list(request: Request[Any, Any, Any], p: Principal, scope: cmd.Lookup) -> list[SecretInfo]:
    found = await gateway_of(request).client.call(
        "secrets",
        "list",
        cmd.ListSecrets(meta=meta(request), org_id=p.org_id, user_id=p.user_id, scope=scope),
        cmd.SecretList,
    )
    return [_info(s) for s in found.secrets]


async def _get(request: Request[Any, Any, Any], p: Principal, scope: cmd.Scope, name: str) -> SecretInfo:
    found = await gateway_of(request).client.call(
        "secrets",
        "get",
        cmd.GetSecret(meta=meta(request), org_id=p.org_id, user_id=p.user_id, scope=scope, name=name),
        cmd.SecretView,
    )
    return _info(found)


async def _delete(request: Request[Any, Any, Any], p: Principal, scope: cmd.Scope, name: str) -> None:
    await gateway_of(request).client.call(
        "secrets",
        "delete",
        cmd.DeleteSecret(meta=meta(request), org_id=p.org_id, user_id=p.user_id, scope=scope, name=name),
        Empty,
    )


class SecretsController(Controller):
    path = "/v1/secrets"
    tags = ["secrets"]

    @put("/{name:str}", summary="Set or replace my secret (the value is never shown again)")
    async def put_secret(self, request: Request[Any, Any, Any], name: str, data: SecretValue) -> SecretInfo:
        return await _put(request, caller(request), "user", name, data.value)

    @get("/", summary="My secrets and my org's (metadata only)")
    async def list_secrets(self, request: Request[Any, Any, Any]) -> list[SecretInfo]:
        return await _list(request, caller(request), "any")

    @get("/{name:str}", summary="One of my secrets (metadata only)")
    async def get_secret(self, request: Request[Any, Any, Any], name: str) -> SecretInfo:
        return await _get(request, caller(request), "user", name)

    @delete("/{name:str}", status_code=HTTP_204_NO_CONTENT, summary="Revoke my secret (destroys its keys)")
    async def delete_secret(self, request: Request[Any, Any, Any], name: str) -> None:
        await _delete(request, caller(request), "user", name)


class OrgSecretsController(Controller):
    """Members read the metadata; only admins set or revoke."""

    path = "/v1/org/secrets"
    tags = ["secrets"]

    @put("/{name:str}", summary="Set or replace an org secret (admins)")
    async def put_secret(self, request: Request[Any, Any, Any], name: str, data: SecretValue) -> SecretInfo:
        return await _put(request, admin(request), "org", name, data.value)

    @get("/", summary="My org's secrets (metadata only)")
    async def list_secrets(self, request: Request[Any, Any, Any]) -> list[SecretInfo]:
        return await _list(request, caller(request), "org")

    @get("/{name:str}", summary="One org secret (metadata only)")
    async def get_secret(self, request: Request[Any, Any, Any], name: str) -> SecretInfo:
        return await _get(request, caller(request), "org", name)

    @delete("/{name:str}", status_code=HTTP_204_NO_CONTENT, summary="Revoke an org secret (admins)")
    async def delete_secret(self, request: Request[Any, Any, Any], name: str) -> None:
        await _delete(request, admin(request), "org", name)
