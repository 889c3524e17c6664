"""NATS and PostgreSQL outages, with every service running as its own OS process.

While a server is down, `/ready` names it and commands answer 503 with a sentence (quickly,
not after a hang); when the server is back, on the same port / data dir, the services
recover without being restarted, and nothing recorded before the outage is lost.
"""

import base64
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from contracts.commands.identity import CreateUser, UserCreated
from contracts.subjects import SERVICES
from services.kit.bus import connect
from services.kit.config import load_settings
from services.kit.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from services.kit.rpc import CommandClient
from tests.helpers import OPERATOR, eventually, spawn_service

pytestmark = pytest.mark.integration

KEYS = "/v1/users/me/mcp-keys"
PROBLEM_JSON = "application/problem+json"
RECOVERY = 60.0  # reconnect back-offs are capped at 5 s; leave plenty of room


class Postgres:
    """An EmbeddedPostgres that can be stopped and started again on the same data dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.server: EmbeddedPostgres | None = None

    def start(self, delete_on_stop: bool = False) -> str:
        self.server = EmbeddedPostgres(self.root, delete_on_stop=delete_on_stop).start()
        return self.server.url

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path / "nats", port=free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[Postgres]:
    pg = Postgres(tmp_path / "pg" / "data")
    pg.start()
    yield pg
    # the last start deletes the data dir when it stops
    if pg.server is not None:
        pg.stop()
    pg.start(delete_on_stop=True)
    pg.stop()


def stop_gently(process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Deployment:
    url: str
    env: dict[str, str]
    processes: dict[str, subprocess.Popen[bytes]]
    logs: Path
    user: UserCreated

    def log_tail(self) -> str:
        out = []
        for name in self.processes:
            text = (self.logs / f"{name}.log").read_text(errors="replace")
            out.append(f"--- {name}.log ---\n{text[-3000:]}")
        return "\n".join(out)

    def assert_all_running(self) -> None:
        dead = {n: p.returncode for n, p in self.processes.items() if p.poll() is not None}
        assert not dead, f"services exited (they must survive an outage): {dead}\n{self.log_tail()}"


@pytest.fixture
async def deployment(
    nats_server: EmbeddedNats, postgres: Postgres, tmp_path: Path
) -> AsyncIterator[Deployment]:
    assert postgres.server is not None
    env = {
        "GATEHOUSE_NATS_URL": nats_server.url,
        "GATEHOUSE_DATABASE_URL": postgres.server.url,
        "GATEHOUSE_KEY_PEPPER": base64.b64encode(os.urandom(32)).decode(),
        "GATEHOUSE_MASTER_KEYS": "outage-1:" + base64.b64encode(os.urandom(32)).decode(),
        "GATEHOUSE_DATA_DIR": str(tmp_path / "data"),
        "GATEHOUSE_LOG_LEVEL": "INFO",
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    port = free_port()
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in SERVICES:
            processes[name] = spawn_service(name, env, logs / f"{name}.log")
        processes["gateway"] = spawn_service(
            "gateway", env, logs / "gateway.log", GATEHOUSE_HTTP_PORT=str(port)
        )
        url = f"http://127.0.0.1:{port}"
        bus = await connect(load_settings(env), "test")
        try:
            request = CreateUser(meta=OPERATOR, email="ops@example.test", org="ops")

            async def created() -> UserCreated | None:
                try:
                    return await CommandClient(bus).call("identity", "create_user", request, UserCreated)
                except Exception:
                    return None

            user = await eventually(created, timeout=60, step=0.5)
        finally:
            await bus.close()
        d = Deployment(url, env, processes, logs, user)
        async with httpx.AsyncClient(base_url=url, timeout=10.0) as http:
            try:
                await eventually(lambda: ready(http), timeout=60, step=0.2)
                await eventually(lambda: accepted(http, user.api_key), timeout=30, step=0.2)
            except AssertionError as err:
                raise AssertionError(f"{err}\n{d.log_tail()}") from None
        yield d
    finally:
        for process in processes.values():
            stop_gently(process)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def ready(http: httpx.AsyncClient) -> bool:
    try:
        return (await http.get("/ready")).status_code == 200
    except httpx.TransportError:
        return False


async def accepted(http: httpx.AsyncClient, key: str) -> bool:
    return (await http.get("/v1/me", headers=auth(key))).status_code == 200


async def not_ready_naming(http: httpx.AsyncClient, what: str) -> dict[str, Any] | None:
    response = await http.get("/ready")
    if response.status_code != 503:
        return None
    assert response.headers["content-type"].startswith(PROBLEM_JSON), response.headers
    body: dict[str, Any] = response.json()
    return body if what in body["detail"] else None


async def refused_with_503(http: httpx.AsyncClient, key: str, name: str) -> str:
    """Issues a key while a server is down: a 503 problem with a sentence, within the timeout."""
    response = await http.post(KEYS, json={"name": name}, headers=auth(key))
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON), response.headers
    detail = response.json()["detail"]
    assert isinstance(detail, str) and len(detail.split()) >= 3, detail
    return str(detail)


async def works_again(http: httpx.AsyncClient, key: str, name: str) -> dict[str, Any]:
    """After the outage: a command succeeds, its key is accepted, and the trail records it."""

    async def issued() -> dict[str, Any] | None:
        response = await http.post(KEYS, json={"name": name}, headers=auth(key))
        return response.json() if response.status_code == 201 else None

    new_key: dict[str, Any] = await eventually(issued, timeout=RECOVERY, step=0.5)
    await eventually(lambda: accepted(http, new_key["api_key"]), timeout=RECOVERY, step=0.2)

    async def audited() -> bool:
        page = await http.get("/v1/audit", params={"resource_id": new_key["id"]}, headers=auth(key))
        return page.status_code == 200 and any(e["action"] == "api_key.issued" for e in page.json()["items"])

    await eventually(audited, timeout=RECOVERY, step=0.5)
    return new_key


async def recorded(http: httpx.AsyncClient, key: str) -> dict[str, Any]:
    keys = await http.get(KEYS, headers=auth(key))
    trail = await http.get("/v1/audit", params={"limit": 500}, headers=auth(key))
    assert keys.status_code == 200 and trail.status_code == 200, (keys.text, trail.text)
    return {
        "keys": {k["id"]: k["name"] for k in keys.json()},
        "audit": {e["id"]: e["hash"] for e in trail.json()["items"]},
    }


def assert_kept(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["keys"].items() <= after["keys"].items(), "keys recorded before the outage were lost"
    assert before["audit"].items() <= after["audit"].items(), "audit entries from before the outage changed"


async def test_nats_outage_is_reported_and_survived(
    deployment: Deployment, nats_server: EmbeddedNats
) -> None:
    key = deployment.user.api_key
    async with httpx.AsyncClient(base_url=deployment.url, timeout=10.0) as http:
        before_key = await works_again(http, key, "before the outage")
        before = await recorded(http, key)

        nats_server.stop()
        body = await eventually(lambda: not_ready_naming(http, "NATS"), timeout=30, step=0.2)
        assert "NATS" in body["missing"], body
        detail = await refused_with_503(http, key, "during the outage")
        me = await http.get("/v1/me", headers=auth(key))
        assert me.status_code == 200, "authentication is local and keeps working without NATS"

        nats_server.start()  # same port, same JetStream store dir
        await eventually(lambda: ready(http), timeout=RECOVERY, step=0.5)
        deployment.assert_all_running()
        after_key = await works_again(http, key, "after the outage")
        gone = await http.delete(f"{KEYS}/{after_key['id']}", headers=auth(key))
        assert gone.status_code == 204, gone.text
        assert not await accepted(http, after_key["api_key"])
        assert await accepted(http, before_key["api_key"])
        after = await recorded(http, key)
        assert_kept(before, after)
        assert "during the outage" not in after["keys"].values(), (
            "a command answered with 503 during the outage was carried out after it"
        )
        # Checked last, so that the recovery above is verified whatever this says: the 503
        # must name what is missing (as /ready does), not blame a service that is fine.
        assert "nats" in detail.lower() or "message bus" in detail.lower(), detail


async def test_postgres_outage_is_reported_and_survived(deployment: Deployment, postgres: Postgres) -> None:
    key = deployment.user.api_key
    async with httpx.AsyncClient(base_url=deployment.url, timeout=10.0) as http:
        before_key = await works_again(http, key, "before the outage")
        before = await recorded(http, key)

        postgres.stop()
        body = await eventually(lambda: not_ready_naming(http, "PostgreSQL"), timeout=30, step=0.2)
        assert "PostgreSQL" in body["missing"], body
        await refused_with_503(http, key, "during the outage")
        me = await http.get("/v1/me", headers=auth(key))
        assert me.status_code == 200, "authentication is local and keeps working without PostgreSQL"

        postgres.start()  # same data dir
        await eventually(lambda: ready(http), timeout=RECOVERY, step=0.5)
        deployment.assert_all_running()
        after_key = await works_again(http, key, "after the outage")
        gone = await http.delete(f"{KEYS}/{after_key['id']}", headers=auth(key))
        assert gone.status_code == 204, gone.text
        assert not await accepted(http, after_key["api_key"])
        assert await accepted(http, before_key["api_key"])
        after = await recorded(http, key)
        assert_kept(before, after)
        assert "during the outage" not in after["keys"].values(), (
            "a command answered with 503 during the outage was carried out after it"
        )
