"""Builds under `gatehouse up`, as a product backend uses them over real HTTP.

`up` runs the default agent command (`cursor-agent -p --force --output-format stream-json`);
a `cursor-agent` on PATH stands in for the real one (tests/agents/fake_agent.py behind a
shim). This is where the NATS permissions of every service user are in force, and where the
SSE stream is read as it arrives.
"""

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.e2e.conftest import Platform
from tests.helpers import eventually_sync

pytestmark = pytest.mark.e2e

FAKE_AGENT = Path(__file__).resolve().parents[1] / "agents" / "fake_agent.py"
KEY = "key_e2e_" + "0a1b2c3d" * 4


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    shims = tmp_path_factory.mktemp("bin")
    shim = shims / "cursor-agent"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE_AGENT} "$@"\n')
    shim.chmod(0o755)
    path = os.environ["PATH"]
    os.environ["PATH"] = f"{shims}:{path}"
    platform = Platform(tmp_path_factory.mktemp("gatehouse-up-builds"))
    try:
        platform.start()
        yield platform
    finally:
        os.environ["PATH"] = path
        if platform.process is not None:
            platform.stop()
            assert platform.leftovers() == []
            platform.kill()


@pytest.fixture(scope="module")
def http(up: Platform) -> Iterator[httpx.Client]:
    with up.client() as client:
        client.headers["Authorization"] = f"Bearer {up.admin_key}"
        put = client.put("/v1/secrets/cursor_api_key", json={"value": KEY})
        assert put.status_code == 200, put.text
        yield client


def sse(response: httpx.Response) -> Iterator[tuple[float, dict[str, str]]]:
    """(arrival time, event) as each event arrives."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if not line:
            if fields:
                yield time.monotonic(), fields
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value


def test_a_build_streams_its_lines_live_and_completes(http: httpx.Client, up: Platform) -> None:
    started = http.post("/v1/builds", json={"prompts": ["e2e-marker leak sleep:2", "second step"]})
    assert started.status_code == 202, started.text
    build_id = started.json()["build_id"]
    events: list[tuple[float, dict[str, str]]] = []
    with http.stream("GET", f"/v1/builds/{build_id}/stream", timeout=60) as response:
        assert response.status_code == 200
        events = list(sse(response))
    logs = [(at, json.loads(e["data"])) for at, e in events if e.get("event") == "log"]
    statuses = [(at, json.loads(e["data"])["status"]) for at, e in events if e.get("event") == "status"]
    assert statuses[-1][1] == "completed", statuses
    first_line_at = min(at for at, _ in logs)
    assert first_line_at < statuses[-1][0] - 1.5  # lines arrived while the agent slept, not at the end
    texts = [line["text"] for _, line in logs]
    assert any("e2e-marker" in t for t in texts) and any("second step" in t for t in texts)
    assert any(t == "my key is [REDACTED]" for t in texts) and not any(KEY in t for t in texts)
    build = http.get(f"/v1/builds/{build_id}").json()
    assert build["status"] == "completed" and len(build["steps"]) == 2 and build["exit_code"] == 0
    out = up.data_dir / "logs" / "builds" / f"{build_id}.out.log"
    assert "e2e-marker" in out.read_text() and KEY not in out.read_text()


def test_a_running_build_is_listed_and_stopped_with_its_processes(http: httpx.Client) -> None:
    build_id = http.post("/v1/builds", json={"prompts": ["sleep:60 grandchild"]}).json()["build_id"]

    def session() -> dict[str, Any] | None:
        found = [s for s in http.get("/v1/sessions").json() if s["build_id"] == build_id and s["pid"]]
        return found[0] if found else None

    running = eventually_sync(session, timeout=30)
    worker = psutil.Process(running["pid"])
    tree = eventually_sync(lambda: worker.children(recursive=True), timeout=15)
    stopped = http.post(f"/v1/sessions/{build_id}/stop")
    assert stopped.status_code == 200 and stopped.json()["status"] == "canceled"

    def alive(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def all_gone() -> bool:
        return not any(alive(p) for p in [worker, *tree])

    eventually_sync(all_gone, timeout=20)
    assert http.get("/v1/sessions").json() == []
