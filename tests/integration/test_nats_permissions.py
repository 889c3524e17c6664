"""The NATS server itself is the wall around reveals.

NATS runs with the authorization `gatehouse up` generates (services/kit/natsauth.py) and
the secrets service connects as its own user. The gateway's user is refused on
`cmd.secrets.reveal` by the server (a permissions violation, no reply), cannot listen on
`cmd.secrets.>` nor read mcp_proxy's replies; the mcp_proxy user is answered. Only mcp_proxy
publishes, and only the gateway hears, a tool call's notifications. Anonymous connections
are refused.
"""

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.errors import TimeoutError as NatsTimeout

from contracts.commands import secrets as cmd
from contracts.commands.common import CommandMeta
from contracts.envelope import Actor
from services.kit import natsauth
from services.kit.config import Settings, load_settings
from services.kit.embedded import EmbeddedNats
from services.secrets.adapters.keyfile import write_keyring
from services.secrets.bootstrap import build as secrets_build
from services.secrets.crypto import new_master_key
from tests.helpers import running

pytestmark = pytest.mark.integration

VALUE = "ghp_" + "Zy9" * 12


class Secured(msgspec.Struct):
    url: str
    passwords: dict[str, str]
    settings: Settings  # for the secrets service, as its own NATS user


@pytest.fixture
async def secured(database_url: str, tmp_path: Path) -> AsyncIterator[Secured]:
    passwords = {user: uuid.uuid4().hex for user in natsauth.USERS}
    server = EmbeddedNats(tmp_path / "nats", extra_config=natsauth.authorization_config(passwords)).start()
    assert (tmp_path / "nats" / "nats.conf").stat().st_mode & 0o777 == 0o600
    keyring = tmp_path / "master-keys"
    write_keyring(keyring, new_master_key("k1"))
    settings = load_settings(
        {
            "GATEHOUSE_NATS_URL": server.url,
            "GATEHOUSE_NATS_USER": "secrets",
            "GATEHOUSE_NATS_PASSWORD": passwords["secrets"],
            "GATEHOUSE_DATABASE_URL": database_url,
            "GATEHOUSE_DATA_DIR": str(tmp_path / "data"),
            "GATEHOUSE_MASTER_KEYS_FILE": str(keyring),
        }
    )
    try:
        yield Secured(server.url, passwords, settings)
    finally:
        server.stop()


async def as_user(s: Secured, user: str, errors: list[str]) -> nats.NATS:
    async def on_error(err: Exception) -> None:
        errors.append(str(err))

    return await nats.connect(
        s.url,
        user=user,
        password=s.passwords[user],
        inbox_prefix=natsauth.inbox_prefix(user),
        error_cb=on_error,
        allow_reconnect=False,
    )


def request(name: str, service: str) -> bytes:
    meta = CommandMeta(actor=Actor(kind="service", id=service), correlation_id="perm-test")
    return msgspec.json.encode(
        cmd.RevealSecret(
            meta=meta,
            service=service,
            purpose="tool_call:perm-1",
            org_id="org-1",
            user_id="user-1",
            name=name,
        )
    )


async def test_only_the_revealers_reach_the_reveal_subject(secured: Secured) -> None:
    async with running(secrets_build, secured.settings, "secrets") as bus:
        put = cmd.PutSecret(
            meta=CommandMeta(actor=Actor(kind="user", id="user-1"), correlation_id="c"),
            org_id="org-1",
            user_id="user-1",
            name="github_token",
            value=VALUE,
        )
        stored = await bus.nc.request("cmd.secrets.put", msgspec.json.encode(put), timeout=5)
        assert b'"ok":true' in stored.data

        errors: list[str] = []
        proxy = await as_user(secured, "mcp_proxy", errors)
        reply = await proxy.request("cmd.secrets.reveal", request("github_token", "mcp_proxy"), timeout=5)
        assert msgspec.json.decode(reply.data)["value"]["value"] == VALUE

        runner = await as_user(secured, "session_runner", errors)
        reply = await runner.request(
            "cmd.secrets.reveal", request("github_token", "session_runner"), timeout=5
        )
        assert b"reveal_refused" in reply.data  # the service checks the purpose (build:<id>) too
        assert errors == []

        gateway_errors: list[str] = []
        gateway = await as_user(secured, "gateway", gateway_errors)
        with pytest.raises(NatsTimeout):
            await gateway.request("cmd.secrets.reveal", request("github_token", "mcp_proxy"), timeout=1)
        assert any('permissions violation for publish to "cmd.secrets.reveal"' in e for e in gateway_errors)

        # nor can it listen in: not on the service's subjects, not on mcp_proxy's replies, and
        # a catch-all subscription is not sent what those carry
        seen: list[bytes] = []

        async def overheard(msg: Any) -> None:
            seen.append(msg.subject.encode() + b" " + msg.data)

        await gateway.subscribe(">", cb=overheard)
        await gateway.flush()
        await bus.nc.request("cmd.secrets.put", msgspec.json.encode(put), timeout=5)
        reply = await proxy.request("cmd.secrets.reveal", request("github_token", "mcp_proxy"), timeout=5)
        assert VALUE.encode() in reply.data
        await asyncio.sleep(0.3)
        assert seen and not [m for m in seen if VALUE.encode() in m], seen  # it does hear the rest
        await gateway.subscribe("cmd.secrets.>")
        await gateway.subscribe("_INBOX_mcp_proxy.>")
        await gateway.flush()
        await asyncio.sleep(0.2)
        lowered = [e.lower() for e in gateway_errors]  # nats-py lowercases server errors
        assert any('subscription to "cmd.secrets.>"' in e for e in lowered), gateway_errors
        assert any('subscription to "_inbox_mcp_proxy.>"' in e for e in lowered), gateway_errors
        reply = await proxy.request("cmd.secrets.reveal", request("github_token", "mcp_proxy"), timeout=5)
        assert b'"ok":true' in reply.data  # the service still answers mcp_proxy, and only it

        # every other service user and the operator are refused by the server as well
        for user in natsauth.USERS:
            if user in natsauth.REVEALERS:
                continue
            user_errors: list[str] = []
            conn = await as_user(secured, user, user_errors)
            with pytest.raises(NatsTimeout):
                await conn.request("cmd.secrets.reveal", request("github_token", "mcp_proxy"), timeout=0.5)
            assert any("permissions violation" in e for e in user_errors), (user, user_errors)
            await conn.close()
        for conn in (proxy, runner, gateway):
            await conn.close()


@pytest.mark.parametrize(
    ("wildcard", "subject"),
    [("mcp.notify.>", "mcp.notify.call-1"), ("mcp.tools_changed.>", "mcp.tools_changed.user-1")],
)
async def test_only_mcp_proxy_tells_only_the_gateway_about_a_call(
    secured: Secured, wildcard: str, subject: str
) -> None:
    """`mcp.notify.<request id>`: a tool call's progress and log lines, for one user;
    `mcp.tools_changed.<user id>`: an upstream's own tools change, for one user."""
    errors: dict[str, list[str]] = {user: [] for user in natsauth.USERS}
    conns = {user: await as_user(secured, user, errors[user]) for user in natsauth.USERS}
    heard: dict[str, list[bytes]] = {user: [] for user in natsauth.USERS}
    for user, conn in conns.items():

        async def got(msg: Any, user: str = user) -> None:
            heard[user].append(msg.data)

        await conn.subscribe(wildcard, cb=got)
        await conn.flush()
    await asyncio.sleep(0.2)
    for user in natsauth.USERS:
        refused = any(f'subscription to "{wildcard}"' in e.lower() for e in errors[user])
        assert refused == (user != "gateway"), (user, errors[user])
    for user, conn in conns.items():
        await conn.publish(subject, f"from {user}".encode())
        await conn.flush()
    await asyncio.sleep(0.3)
    assert heard["gateway"] == [b"from mcp_proxy"]  # no one else's reached it, and no one else heard
    assert all(not heard[u] for u in natsauth.USERS if u != "gateway")
    for user in natsauth.USERS:
        refused = any(f'publish to "{subject}"' in e.lower() for e in errors[user])
        assert refused == (user != "mcp_proxy"), (user, errors[user])
    for conn in conns.values():
        await conn.close()


async def test_anonymous_and_wrong_passwords_are_refused(secured: Secured) -> None:
    for user, password in ((None, None), ("gateway", "wrong"), ("nobody", "x")):
        with pytest.raises(Exception, match="Authorization Violation"):
            await nats.connect(
                secured.url, user=user, password=password, allow_reconnect=False, max_reconnect_attempts=0
            )
