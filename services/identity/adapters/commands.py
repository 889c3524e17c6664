"""Identity's commands on NATS: decode, run the handler in a worker thread, reply."""

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from contracts.commands import identity as cmd
from contracts.commands.common import CommandMeta, Empty
from services.identity.application import Identity
from services.identity.domain import Conflict, IdentityError, Invalid, NotFound, User
from services.kit.rpc import CommandFailed, CommandServer, refuse

T = TypeVar("T")


def meta_dict(meta: CommandMeta) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(meta)
    return out


async def _run(fn: Callable[..., T], *args: Any) -> T:
    try:
        return await asyncio.to_thread(fn, *args)
    except NotFound as err:
        raise refuse(404, "Not found", str(err)) from None
    except Conflict as err:
        raise refuse(409, "Conflict", str(err)) from None
    except Invalid as err:
        raise refuse(400, "Invalid request", str(err)) from None
    except IdentityError as err:
        raise refuse(400, "Refused", str(err)) from None


def user_view(user: User) -> cmd.UserView:
    return cmd.UserView(
        user_id=str(user.id),
        email=user.email,
        org_id=user.org_id,
        tier=user.tier,
        is_admin=user.is_admin,
        created_at=user.created_on,
    )


def key_view(key: dict[str, Any]) -> cmd.KeyView:
    return cmd.KeyView(
        id=key["id"],
        name=key["name"],
        prefix=key["prefix"],
        created_at=key["created_at"],
        expires_at=key["expires_at"],
        last_used_at=key["last_used_at"],
        revoked_at=key["revoked_at"],
    )


def routes(server: CommandServer, app: Identity) -> None:
    async def create_user(c: cmd.CreateUser) -> cmd.UserCreated:
        user, key_id, api_key = await _run(
            app.create_user,
            c.email,
            c.org,
            c.tier,
            c.is_admin,
            c.key_name,
            meta_dict(c.meta),
            c.org_id,
        )
        return cmd.UserCreated(user_id=str(user.id), org_id=user.org_id, key_id=key_id, api_key=api_key)

    async def bootstrap_admin(c: cmd.EnsureBootstrapAdmin) -> cmd.BootstrapAdmin:
        existing = await _run(app.user_by_email, c.email)
        if existing is not None:
            return cmd.BootstrapAdmin(created=False, user_id=str(existing.id))
        try:
            user, _, api_key = await _run(
                app.create_user, c.email, c.org, "enterprise", True, "bootstrap", meta_dict(c.meta)
            )
        except CommandFailed as failed:
            if failed.problem.status != 409:
                raise
            again = await _run(app.user_by_email, c.email)
            assert again is not None
            return cmd.BootstrapAdmin(created=False, user_id=str(again.id))
        return cmd.BootstrapAdmin(created=True, user_id=str(user.id), api_key=api_key)

    async def list_users(c: cmd.ListUsers) -> cmd.UserList:
        users = await _run(app.org_users, c.org_id)
        return cmd.UserList([user_view(u) for u in sorted(users, key=lambda u: u.created_on)])

    async def set_tier(c: cmd.SetTier) -> cmd.UserView:
        return user_view(await _run(app.set_tier, c.org_id, c.user_id, c.tier, meta_dict(c.meta)))

    async def issue_key(c: cmd.IssueKey) -> cmd.KeyIssued:
        user, key_id, api_key = await _run(
            app.issue_key, c.user_id, c.name, c.expires_in_days, meta_dict(c.meta)
        )
        key = user.keys[key_id]
        return cmd.KeyIssued(
            id=key_id,
            name=key["name"],
            api_key=api_key,
            prefix=key["prefix"],
            created_at=key["created_at"],
            expires_at=key["expires_at"],
        )

    async def list_keys(c: cmd.ListKeys) -> cmd.KeyList:
        user = await _run(app.user, c.user_id)
        keys = sorted(user.keys.values(), key=lambda k: k["created_at"])
        return cmd.KeyList([key_view(k) for k in keys])

    async def revoke_key(c: cmd.RevokeKey) -> Empty:
        await _run(app.revoke_key, c.user_id, c.key_id, meta_dict(c.meta))
        return Empty()

    async def touch_key(c: cmd.TouchKey) -> Empty:
        await _run(app.touch_key, c.user_id, c.key_id, c.used_at)
        return Empty()

    server.route("create_user", cmd.CreateUser, create_user)
    server.route("bootstrap_admin", cmd.EnsureBootstrapAdmin, bootstrap_admin)
    server.route("list_users", cmd.ListUsers, list_users)
    server.route("set_tier", cmd.SetTier, set_tier)
    server.route("issue_key", cmd.IssueKey, issue_key)
    server.route("list_keys", cmd.ListKeys, list_keys)
    server.route("revoke_key", cmd.RevokeKey, revoke_key)
    server.route("touch_key", cmd.TouchKey, touch_key)
