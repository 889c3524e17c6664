"""A platform for the build tests: identity, audit, secrets, quota and the dispatcher in-process
on real NATS and PostgreSQL, the gateway's Litestar app through httpx's ASGI transport (in the
test's own event loop), and runner nodes started on demand, in-process or as OS processes.

The agent is tests/agents/fake_agent.py (it reports the sha256 of its key and obeys words in
its prompt); users keep their agent key as the secret `cursor_api_key`.
"""

import asyncio
import hashlib
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from contracts.commands.common import CommandMeta
from contracts.commands.identity import CreateUser, UserCreated
from contracts.envelope import Actor
from services.audit.bootstrap import build as audit_build
from services.dispatcher.bootstrap import build as dispatcher_build
from services.gateway.bootstrap import assemble
from services.identity.bootstrap import build as identity_build
from services.kit.bus import Bus, connect, ensure_stream
from services.kit.config import Settings
from services.kit.rpc import CommandClient
from services.quota.bootstrap import build as quota_build
from services.secrets.bootstrap import build as secrets_build
from services.session_runner.bootstrap import build as runner_build
from tests.helpers import eventually, running, spawn_service, stop_process, wait_ready
from tests.integration.secrets_world import secrets_settings

REPO = Path(__file__).resolve().parents[2]
FAKE_AGENT = f"{sys.executable} {REPO / 'tests' / 'agents' / 'fake_agent.py'}"
TERMINAL = {"completed", "failed", "canceled"}


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@dataclass
class BuildWorld:
    http: httpx.AsyncClient
    bus: Bus
    client: CommandClient
    settings: Settings
    env: dict[str, str]
    tmp_path: Path
    monkeypatch: pytest.MonkeyPatch
    users: dict[str, UserCreated] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir

    def headers(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.users[who].api_key}"}

    async def user(self, who: str, tier: str = "free", org: str = "acme") -> UserCreated:
        meta = CommandMeta(actor=Actor(kind="operator", id="test"), correlation_id=f"create-{who}")
        request = CreateUser(meta=meta, email=f"{who}@{org}.test", org=org, tier=tier)
        created = await self.client.call("identity", "create_user", request, UserCreated)
        self.users[who] = created
        await eventually(lambda: self._known(who), timeout=30)
        return created

    async def _known(self, who: str) -> bool:
        return (await self.http.get("/v1/me", headers=self.headers(who))).status_code == 200

    async def set_key(self, who: str, value: str) -> None:
        put = await self.http.put(
            "/v1/secrets/cursor_api_key", json={"value": value}, headers=self.headers(who)
        )
        assert put.status_code == 200, put.text
        self.keys[who] = value

    async def start(self, who: str, prompts: list[str], **body: Any) -> str:
        response = await self.http.post(
            "/v1/builds", json={"prompts": prompts, **body}, headers=self.headers(who)
        )
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "queued"
        build_id: str = response.json()["build_id"]
        return build_id

    async def build(self, who: str, build_id: str) -> dict[str, Any]:
        got = await self.http.get(f"/v1/builds/{build_id}", headers=self.headers(who))
        assert got.status_code == 200, got.text
        body: dict[str, Any] = got.json()
        return body

    async def until(
        self, who: str, build_id: str, done: Callable[[dict[str, Any]], bool], timeout: float = 30
    ) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            body = await self.build(who, build_id)
            return body if done(body) else None

        found: dict[str, Any] = await eventually(check, timeout=timeout, step=0.1)
        return found

    async def ended(self, who: str, build_id: str, timeout: float = 30) -> dict[str, Any]:
        return await self.until(who, build_id, lambda b: b["status"] in TERMINAL, timeout)

    async def session(self, who: str, build_id: str, timeout: float = 30) -> dict[str, Any]:
        async def running_with_pid() -> dict[str, Any] | None:
            listed = await self.http.get("/v1/sessions", headers=self.headers(who))
            assert listed.status_code == 200, listed.text
            found = [s for s in listed.json() if s["build_id"] == build_id and s["pid"]]
            return found[0] if found else None

        found: dict[str, Any] = await eventually(running_with_pid, timeout=timeout, step=0.1)
        return found

    async def lines(self, who: str, build_id: str, after: int = 0) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            page = await self.http.get(
                f"/v1/builds/{build_id}/logs",
                params={"after": after, "limit": 2000},
                headers=self.headers(who),
            )
            assert page.status_code == 200, page.text
            body = page.json()
            out += body["lines"]
            after = body["next_after"]
            if not body["more"]:
                return out

    def configure(self, **settings: str | int | float) -> None:
        """Runner/dispatcher settings (read from the environment when a service is built)."""
        for name, value in settings.items():
            self.monkeypatch.setenv(name, str(value))
            self.env[name] = str(value)

    @asynccontextmanager
    async def runner(self, node: str = "node-a", **settings: str | int | float) -> AsyncIterator[Bus]:
        self.configure(GATEHOUSE_RUNNER_NODE=node, **settings)
        async with running(runner_build, self.settings, "session_runner") as bus:
            yield bus

    async def spawn_runner(self, node: str, **settings: str | int | float) -> subprocess.Popen[bytes]:
        self.configure(**settings)
        log = self.tmp_path / f"runner-{node}.log"
        proc = spawn_service("session_runner", self.env, log, GATEHOUSE_RUNNER_NODE=node)
        self.processes.append(proc)
        await wait_ready(self.bus, "session_runner")
        return proc


@pytest.fixture
async def build_world(
    service_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[BuildWorld]:
    settings, keyring = secrets_settings(service_env, tmp_path)
    env = {**service_env, "GATEHOUSE_MASTER_KEYS_FILE": str(keyring), "GATEHOUSE_AGENT_COMMAND": FAKE_AGENT}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    async with (
        running(identity_build, settings, "identity") as bus,
        running(audit_build, settings, "audit"),
        running(secrets_build, settings, "secrets"),
        running(quota_build, settings, "quota"),
        running(dispatcher_build, settings, "dispatcher"),
    ):
        gateway_bus = await connect(settings, "gateway")
        await ensure_stream(gateway_bus, settings)
        app, feed = await assemble(settings, gateway_bus)
        client = CommandClient(bus)
        world: BuildWorld | None = None
        try:
            await wait_ready(bus, "quota")
            transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 4711))  # type: ignore[arg-type]
            async with httpx.AsyncClient(
                transport=transport, base_url="http://gatehouse.test", timeout=60
            ) as http:
                world = BuildWorld(http, bus, client, settings, env, tmp_path, monkeypatch)
                yield world
        finally:
            if world is not None:
                for proc in world.processes:
                    stop_process(proc)
            await feed.stop()
            await gateway_bus.close()
            await asyncio.sleep(0)
