"""A running platform for the secrets tests: identity, audit and secrets in-process on real
NATS and PostgreSQL, and the gateway's Litestar app driven through httpx's ASGI transport in
the test's own event loop (as tests/integration/test_gateway_http.py explains)."""

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar

from contracts.commands import secrets as cmd
from contracts.commands.common import CommandMeta
from contracts.commands.identity import UserCreated
from contracts.envelope import Actor
from services.kit.bus import Bus
from services.kit.config import Settings, load_settings
from services.kit.rpc import CommandClient
from services.secrets.adapters.keyfile import write_keyring
from services.secrets.bootstrap import build as secrets_build
from services.secrets.crypto import new_master_key
from tests.integration.gateway_world import two_orgs_gateway


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class World:
    app: Litestar
    http: httpx.AsyncClient
    bus: Bus
    client: CommandClient
    settings: Settings
    keyring_file: Path
    admin: UserCreated  # admin of org "alpha"
    ann: UserCreated  # user of "alpha"
    bea: UserCreated  # user of "alpha"
    zed: UserCreated  # admin of org "beta"

    def headers(self, who: UserCreated) -> dict[str, str]:
        return bearer(who.api_key)

    async def reveal(
        self,
        who: UserCreated,
        name: str,
        scope: cmd.Lookup = "any",
        service: str = "mcp_proxy",
        purpose: str = "tool_call:call-1",
    ) -> cmd.RevealedSecret:
        meta = CommandMeta(actor=Actor(kind="service", id=service), correlation_id=f"c-{uuid.uuid4()}")
        request = cmd.RevealSecret(
            meta=meta,
            service=service,
            purpose=purpose,
            org_id=who.org_id,
            user_id=who.user_id,
            name=name,
            scope=scope,
        )
        return await self.client.call("secrets", "reveal", request, cmd.RevealedSecret)

    async def audit(self, who: UserCreated, **params: Any) -> list[dict[str, Any]]:
        page = await self.http.get("/v1/audit", params={"limit": 500, **params}, headers=self.headers(who))
        assert page.status_code == 200, page.text
        items: list[dict[str, Any]] = page.json()["items"]
        return items


def secrets_settings(service_env: dict[str, str], tmp_path: Path) -> tuple[Settings, Path]:
    keyring_file = tmp_path / "keys" / "master-keys"
    write_keyring(keyring_file, new_master_key("k1"))
    env = {**service_env, "GATEHOUSE_MASTER_KEYS_FILE": str(keyring_file)}
    return load_settings(env), keyring_file


@pytest.fixture
async def world(service_env: dict[str, str], tmp_path: Path) -> AsyncIterator[World]:
    settings, keyring_file = secrets_settings(service_env, tmp_path)
    async with two_orgs_gateway(settings, "203.0.113.9", also=[(secrets_build, "secrets")]) as t:
        yield World(
            t.app,
            t.http,
            t.identity_bus,
            t.identity,
            settings,
            keyring_file,
            t.admin,
            t.ann,
            t.bea,
            t.other_admin,
        )
