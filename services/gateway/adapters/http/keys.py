"""`/v1/me` and the caller's own MCP API keys."""

from typing import Any

from litestar import Controller, Request, delete, get, post
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from contracts.commands import identity as cmd
from contracts.commands.common import Empty
from services.gateway.adapters.http.context import caller, gateway_of, meta
from services.gateway.adapters.http.schemas import IssuedKey, KeyInfo, Me, NewKey


@get("/v1/me", summary="Who am I")
async def me(request: Request[Any, Any, Any]) -> Me:
    p = caller(request)
    return Me(user_id=p.user_id, email=p.email, org_id=p.org_id, tier=p.tier, is_admin=p.is_admin)


class KeysController(Controller):
    path = "/v1/users/me/mcp-keys"
    tags = ["keys"]

    @post("/", status_code=HTTP_201_CREATED, summary="Issue a key (shown once)")
    async def issue(self, request: Request[Any, Any, Any], data: NewKey) -> IssuedKey:
        p = caller(request)
        issued = await gateway_of(request).client.call(
            "identity",
            "issue_key",
            cmd.IssueKey(
                meta=meta(request),
                user_id=p.user_id,
                name=data.name,
                expires_in_days=data.expires_in_days,
            ),
            cmd.KeyIssued,
        )
        gateway = gateway_of(request)
        gateway.learn(
            gateway.issued_key_fact(
                p.user_id, issued.id, issued.api_key, issued.name, issued.created_at, issued.expires_at
            )
        )
        return IssuedKey(
            id=issued.id,
            name=issued.name,
            api_key=issued.api_key,
            prefix=issued.prefix,
            created_at=issued.created_at,
            expires_at=issued.expires_at,
        )

    @get("/", summary="List my keys (never the key itself)")
    async def list(self, request: Request[Any, Any, Any]) -> list[KeyInfo]:
        p = caller(request)
        keys = await gateway_of(request).client.call(
            "identity",
            "list_keys",
            cmd.ListKeys(meta=meta(request), user_id=p.user_id),
            cmd.KeyList,
        )
        return [
            KeyInfo(
                id=k.id,
                name=k.name,
                prefix=k.prefix,
                created_at=k.created_at,
                expires_at=k.expires_at,
                last_used_at=k.last_used_at,
                revoked_at=k.revoked_at,
            )
            for k in keys.keys
        ]

    @delete("/{key_id:str}", status_code=HTTP_204_NO_CONTENT, summary="Revoke a key")
    async def revoke(self, request: Request[Any, Any, Any], key_id: str) -> None:
        p = caller(request)
        gateway = gateway_of(request)
        await gateway.client.call(
            "identity",
            "revoke_key",
            cmd.RevokeKey(meta=meta(request), user_id=p.user_id, key_id=key_id),
            Empty,
        )
        gateway.view.revoke(key_id)  # this gateway at once; the others when the event arrives
