"""Org admins: onboard users into their org, list them, set tiers."""

from datetime import UTC, datetime
from typing import Any

from litestar import Controller, Request, get, post, put
from litestar.exceptions import PermissionDeniedException
from litestar.status_codes import HTTP_201_CREATED

from contracts.commands import identity as cmd
from contracts.events.identity import TierChanged, UserRegistered
from services.gateway.adapters.http.context import admin, gateway_of, meta
from services.gateway.adapters.http.schemas import CreatedUser, NewUser, TierChange, UserInfo


def _info(u: cmd.UserView) -> UserInfo:
    return UserInfo(
        user_id=u.user_id,
        email=u.email,
        org_id=u.org_id,
        tier=u.tier,
        is_admin=u.is_admin,
        created_at=u.created_at,
    )


class AdminUsersController(Controller):
    path = "/v1/admin/users"
    tags = ["admin"]

    @post("/", status_code=HTTP_201_CREATED, summary="Create a user in my org")
    async def create(self, request: Request[Any, Any, Any], data: NewUser) -> CreatedUser:
        p = admin(request)
        gateway = gateway_of(request)
        own_org = gateway.view.org_names.get(p.org_id)
        if data.org is not None and data.org.lower() != own_org:
            raise PermissionDeniedException(
                f"Admins create users in their own org ({own_org}); ask an operator for another org."
            )
        created = await gateway.client.call(
            "identity",
            "create_user",
            cmd.CreateUser(
                meta=meta(request),
                email=data.email,
                org_id=p.org_id,
                tier=data.tier,
                is_admin=data.is_admin,
            ),
            cmd.UserCreated,
        )
        gateway.learn(
            UserRegistered(
                user_id=created.user_id,
                email=data.email.strip().lower(),
                org_id=created.org_id,
                tier=data.tier,
                is_admin=data.is_admin,
            ),
            gateway.issued_key_fact(
                created.user_id, created.key_id, created.api_key, "default", datetime.now(UTC), None
            ),
        )
        return CreatedUser(user_id=created.user_id, api_key=created.api_key)

    @get("/", summary="Users of my org")
    async def list(self, request: Request[Any, Any, Any]) -> list[UserInfo]:
        p = admin(request)
        users = await gateway_of(request).client.call(
            "identity",
            "list_users",
            cmd.ListUsers(meta=meta(request), org_id=p.org_id),
            cmd.UserList,
        )
        return [_info(u) for u in users.users]

    @put("/{user_id:str}/tier", summary="Set a user's tier")
    async def set_tier(self, request: Request[Any, Any, Any], user_id: str, data: TierChange) -> UserInfo:
        p = admin(request)
        user = await gateway_of(request).client.call(
            "identity",
            "set_tier",
            cmd.SetTier(meta=meta(request), org_id=p.org_id, user_id=user_id, tier=data.tier),
            cmd.UserView,
        )
        gateway_of(request).learn(TierChanged(user_id=user.user_id, tier=user.tier, previous_tier=""))
        return _info(user)
