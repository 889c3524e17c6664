"""Builds end to end on real NATS and PostgreSQL, with a real test agent in real processes.

The product backend's routes (`/v1/builds`, `/v1/sessions`) through the gateway; the
dispatcher, quota and secrets services; runner nodes in-process or as OS processes; worker
processes and the agent processes they start (tests/agents/fake_agent.py).
"""

import json
import os
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import pytest

from services.kit.bus import Bus
from tests.helpers import eventually, stream_envelopes
from tests.integration.builds_world import TERMINAL, BuildWorld, build_world, sha

pytestmark = pytest.mark.integration
__all__ = ["build_world"]

CANARY = "canary-" + "c0ffee42" * 6
BEA_KEY = "bea-key-" + "5eed" * 8
MISSING = "Cursor API key not configured for this user. Please add your API key in Settings."


def reported(lines: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The agent's stream-JSON lines of one type."""
    found = []
    for line in lines:
        try:
            item = json.loads(line["text"])
        except ValueError:
            continue
        if isinstance(item, dict) and item.get("type") == kind:
            found.append(item)
    return found


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def problem(response: Any, status: int, fragment: str = "") -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    detail: str = response.json()["detail"]
    assert fragment in detail, detail
    return detail


async def log_stream_text(bus: Bus) -> str:
    """Every message kept in GATEHOUSE_BUILD_LOGS, as one string."""
    info = await bus.js.stream_info("GATEHOUSE_BUILD_LOGS")
    if not info.state.messages:
        return ""
    sub = await bus.js.subscribe("builds.*.log", ordered_consumer=True)
    parts = []
    try:
        while True:
            msg = await sub.next_msg(timeout=2)
            parts.append(msg.data.decode())
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return "\n".join(parts)


async def test_two_users_builds_run_apart_and_stopping_one_leaves_the_other(build_world: BuildWorld) -> None:
    w = build_world
    await w.user("ann")
    await w.user("bea")
    await w.set_key("ann", CANARY)
    await w.set_key("bea", BEA_KEY)
    async with w.runner("node-a", GATEHOUSE_BUILD_KILL_GRACE_S=2):
        ann = await w.start("ann", ["ann-marker leak sleep:60"])
        bea = await w.start("bea", ["bea-marker sleep:3", "bea-second step"])
        ann_session = await w.session("ann", ann)
        bea_session = await w.session("bea", bea)
        assert ann_session["pid"] != bea_session["pid"]
        assert ann_session["node"] == bea_session["node"] == "node-a"
        assert psutil.pid_exists(ann_session["pid"]) and psutil.pid_exists(bea_session["pid"])

        # A second build of a free-tier user is over the limit while the first runs.
        over = await w.http.post("/v1/builds", json={"prompts": ["more"]}, headers=w.headers("ann"))
        problem(over, 429, "Concurrent build limit reached")
        assert int(over.headers["retry-after"]) > 0

        async def ann_has_leaked() -> list[dict[str, Any]]:
            lines = await w.lines("ann", ann)
            return lines if any("my key is" in line["text"] for line in lines) else []

        ann_lines = await eventually(ann_has_leaked, timeout=30)
        ann_agent = reported(ann_lines, "system")[0]["pid"]
        assert reported(ann_lines, "key")[0]["sha256"] == sha(CANARY)
        assert any("ann-marker" in line["text"] for line in ann_lines)
        assert not any("bea-marker" in line["text"] for line in ann_lines)
        assert any(line["text"] == "my key is [REDACTED]" for line in ann_lines)
        assert any(line["stream"] == "err" and "[REDACTED]" in line["text"] for line in ann_lines)

        # Another user's build does not exist for bea.
        problem(await w.http.get(f"/v1/builds/{ann}", headers=w.headers("bea")), 404)
        problem(await w.http.post(f"/v1/sessions/{ann}/stop", headers=w.headers("bea")), 404)
        problem(await w.http.get(f"/v1/builds/{ann}/logs", headers=w.headers("bea")), 404)

        stopped = await w.http.post(f"/v1/sessions/{ann}/stop", headers=w.headers("ann"))
        assert stopped.status_code == 200, stopped.text
        assert stopped.json()["status"] == "canceled"
        await eventually(lambda: _true(gone(ann_session["pid"]) and gone(ann_agent)), timeout=20)

        done = await w.ended("bea", bea)
        assert done["status"] == "completed", done
        assert [s["status"] for s in done["steps"]] == ["completed", "completed"]
        assert done["exit_code"] == 0 and done["error"] is None
        bea_lines = await w.lines("bea", bea)
        assert {k["sha256"] for k in reported(bea_lines, "key")} == {sha(BEA_KEY)}
        assert not any("ann-marker" in line["text"] for line in bea_lines)
        assert [line["n"] for line in bea_lines] == list(range(1, len(bea_lines) + 1))

        again = await w.http.post(f"/v1/sessions/{ann}/stop", headers=w.headers("ann"))
        assert again.status_code == 200 and again.json()["status"] == "canceled"
        finished = await w.http.post(f"/v1/sessions/{bea}/stop", headers=w.headers("bea"))
        assert finished.status_code == 200 and finished.json()["status"] == "completed"  # idempotent

        async def slots_free() -> bool:
            for who in ("ann", "bea"):
                quota = (await w.http.get("/v1/quota", headers=w.headers(who))).json()
                if quota["concurrent_builds_used"] != 0:
                    return False
            listed = (await w.http.get("/v1/sessions", headers=w.headers(who))).json()
            return listed == []

        await eventually(slots_free, timeout=15)

    # Separate files per build, the key redacted in them too.
    logs = w.data_dir / "logs" / "builds"
    ann_out = (logs / f"{ann}.out.log").read_text()
    bea_out = (logs / f"{bea}.out.log").read_text()
    assert "ann-marker" in ann_out and "bea-marker" not in ann_out
    assert "bea-marker" in bea_out and "ann-marker" not in bea_out
    assert "my key is [REDACTED]" in ann_out
    assert "[REDACTED]" in (logs / f"{ann}.err.log").read_text()
    await assert_canary_nowhere(w, logs.parent.parent)


async def assert_canary_nowhere(w: BuildWorld, data_dir: Path) -> None:
    for path in data_dir.rglob("*"):
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path
    events = await stream_envelopes(w.bus)
    assert events and not any(CANARY in bytes(e.data).decode() for e in events)
    assert CANARY not in await log_stream_text(w.bus)

    async def audited() -> list[dict[str, Any]]:
        page = await w.http.get("/v1/audit", params={"limit": 500}, headers=w.headers("ann"))
        items: list[dict[str, Any]] = page.json()["items"]
        return items if any(i["action"] == "build.canceled" for i in items) else []

    trail = await eventually(audited, timeout=15)
    assert CANARY not in json.dumps(trail)


async def _true(value: bool) -> bool:
    return value


async def test_refusals_say_what_is_wrong(build_world: BuildWorld) -> None:
    w = build_world
    await w.user("cy")
    missing = await w.http.post("/v1/builds", json={"prompts": ["hello"]}, headers=w.headers("cy"))
    assert problem(missing, 409) == MISSING

    async def refusal_audited() -> list[dict[str, Any]]:
        page = await w.http.get("/v1/audit", params={"action": "build.refused"}, headers=w.headers("cy"))
        items: list[dict[str, Any]] = page.json()["items"]
        return items

    entry = (await eventually(refusal_audited, timeout=15))[0]
    assert entry["outcome"] == "denied" and entry["metadata"]["key_name"] == "cursor_api_key"

    await w.set_key("cy", "cy-key-1234567890abcdef")
    post = w.http.post
    problem(
        await post("/v1/builds", json={"prompts": []}, headers=w.headers("cy")), 400, "at least one prompt"
    )
    big = "x" * (32 * 1024 + 1)
    problem(
        await post("/v1/builds", json={"prompts": [big]}, headers=w.headers("cy")), 400, "at most 32768 bytes"
    )
    problem(
        await post("/v1/builds", json={"prompts": ["hi"], "agent": "nope"}, headers=w.headers("cy")),
        400,
        "unknown agent 'nope'",
    )
    problem(
        await post(
            "/v1/builds", json={"prompts": ["hi"], "env": {"CURSOR_API_KEY": "x"}}, headers=w.headers("cy")
        ),
        400,
        "cannot be overridden",
    )
    problem(await post("/v1/builds", json={"prompt": ["hi"]}, headers=w.headers("cy")), 400)
    problem(await w.http.get("/v1/builds/not-a-build", headers=w.headers("cy")), 404)
    problem(
        await w.http.post("/v1/sessions/00000000-0000-4000-8000-000000000000/stop", headers=w.headers("cy")),
        404,
    )
    assert (await w.http.get("/v1/sessions", headers=w.headers("cy"))).json() == []


async def test_a_key_revoked_before_the_start_fails_the_build_naming_it(build_world: BuildWorld) -> None:
    w = build_world
    await w.user("dee")
    await w.set_key("dee", "dee-key-abcdef0123456789")
    build_id = await w.start("dee", ["hello"])  # no runner yet: it stays queued
    assert (await w.build("dee", build_id))["status"] == "queued"
    deleted = await w.http.delete("/v1/secrets/cursor_api_key", headers=w.headers("dee"))
    assert deleted.status_code == 204
    async with w.runner("node-a"):
        done = await w.ended("dee", build_id)
    assert done["status"] == "failed", done
    assert "`cursor_api_key`" in done["error"] and "revoked" in done["error"], done["error"]
    assert done["steps"] == []


async def test_an_agent_command_missing_on_the_node_fails_the_build_clearly(build_world: BuildWorld) -> None:
    w = build_world
    await w.user("eve")
    await w.set_key("eve", "eve-key-abcdef0123456789")
    async with w.runner("node-a", GATEHOUSE_AGENT_COMMAND="/nonexistent/cursor-agent -p"):
        build_id = await w.start("eve", ["hello", "never reached"])
        done = await w.ended("eve", build_id)
    assert done["status"] == "failed"
    assert done["error"].startswith(
        "the agent command `/nonexistent/cursor-agent` was not found on node node-a"
    )
    assert done["exit_code"] == 127 and len(done["steps"]) == 1
    lines = await w.lines("eve", build_id)
    assert "was not found" in lines[-1]["text"]


async def test_the_prompt_can_go_on_stdin_and_env_reaches_the_agent(build_world: BuildWorld) -> None:
    w = build_world
    await w.user("ike")
    await w.set_key("ike", "ike-key-abcdef0123456789")
    async with w.runner("node-a", GATEHOUSE_AGENT_PROMPT_MODE="stdin"):
        build_id = await w.start("ike", ["from-stdin stderr:hi"], env={"DEBUG_LEVEL": "3"})
        done = await w.ended("ike", build_id)
    assert done["status"] == "completed", done
    lines = await w.lines("ike", build_id)
    assert any(line["text"].endswith('"prompt: from-stdin stderr:hi"}') for line in lines)
    assert reported(lines, "key")[0]["sha256"] == sha("ike-key-abcdef0123456789")
    assert reported(lines, "system")[0]["cwd"] == str(w.data_dir / "builds" / build_id)


async def test_limits_stop_steps_and_the_whole_tree_is_reaped(build_world: BuildWorld) -> None:
    w = build_world
    await w.user("fay", tier="enterprise")
    await w.set_key("fay", "fay-key-abcdef0123456789")
    async with w.runner(
        "node-a",
        GATEHOUSE_BUILD_KILL_GRACE_S=1,
        GATEHOUSE_BUILD_STEP_TIMEOUT_S=3,
        GATEHOUSE_BUILD_MAX_OUTPUT_BYTES=200_000,
        GATEHOUSE_BUILD_MEMORY_MB=150,
    ):
        tree = await w.start("fay", ["grandchild grandchild-setsid sleep:0.3", "fail:3", "never run"])
        slow = await w.start("fay", ["sleep:30"])
        flood = await w.start("fay", ["flood:1000000"])
        stubborn = await w.start("fay", ["ignore-term grandchild sleep:60"])
        hog = await w.start("fay", ["alloc:400"])

        done = await w.ended("fay", tree)
        assert done["status"] == "failed" and done["exit_code"] == 3
        assert done["error"] == "step 2 failed with exit code 3"
        assert [s["status"] for s in done["steps"]] == ["completed", "failed"]
        grandchildren = [g["pid"] for g in reported(await w.lines("fay", tree), "grandchild")]
        assert len(grandchildren) == 2
        await eventually(lambda: _true(all(gone(pid) for pid in grandchildren)), timeout=10)

        slow_done = await w.ended("fay", slow)
        assert slow_done["error"] == "step 1 exceeded its time limit of 3 s"

        flood_done = await w.ended("fay", flood)
        assert flood_done["error"] == "the build's output exceeded the limit of 200000 bytes"
        out = w.data_dir / "logs" / "builds" / f"{flood}.out.log"
        assert out.stat().st_size < 260_000

        hog_done = await w.ended("fay", hog)
        assert hog_done["error"] == "step 1 exceeded the memory limit of 150 MB", hog_done

        session = await w.session("fay", stubborn)
        lines = await eventually(lambda: _ignoring(w, stubborn), timeout=15)
        agent = reported(lines, "system")[0]["pid"]
        grandchild = reported(lines, "grandchild")[0]["pid"]
        stopped = await w.http.post(f"/v1/sessions/{stubborn}/stop", headers=w.headers("fay"))
        assert stopped.json()["status"] == "canceled"
        pids = [session["pid"], agent, grandchild]
        await eventually(lambda: _true(all(gone(pid) for pid in pids)), timeout=15)


async def _ignoring(w: BuildWorld, build_id: str) -> list[dict[str, Any]]:
    lines = await w.lines("fay", build_id)
    return lines if reported(lines, "grandchild") else []


async def test_logs_page_and_the_stream_resumes_after_last_event_id(build_world: BuildWorld) -> None:
    w = build_world
    await w.user("gus", tier="pro")
    await w.set_key("gus", "gus-key-abcdef0123456789")
    async with w.runner("node-a"):
        build_id = await w.start("gus", ["flood:50000 stderr:oops"])
        done = await w.ended("gus", build_id)
        assert done["status"] == "completed"
        lines = await w.lines("gus", build_id)
        total = len(lines)
        assert total > 500 and [line["n"] for line in lines] == list(range(1, total + 1))
        page = await w.http.get(
            f"/v1/builds/{build_id}/logs", params={"after": 100, "limit": 50}, headers=w.headers("gus")
        )
        body = page.json()
        assert [line["n"] for line in body["lines"]] == list(range(101, 151))
        assert body["next_after"] == 150 and body["more"] is True and body["status"] == "completed"
        assert any(line["stream"] == "err" and line["text"] == "oops" for line in lines)

        headers = {**w.headers("gus"), "Last-Event-ID": str(total - 3)}
        resumed = await w.http.get(f"/v1/builds/{build_id}/stream", headers=headers)
        assert resumed.status_code == 200 and resumed.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(resumed.text)
        assert [e["id"] for e in events if e["event"] == "log"] == [
            str(n) for n in range(total - 2, total + 1)
        ]
        assert json.loads(events[-1]["data"])["status"] == "completed"

        # A stream opened on a running build carries its lines and status changes to the end.
        live = await w.start("gus", ["live-one sleep:1", "live-two"])
        streamed = await w.http.get(f"/v1/builds/{live}/stream", headers=w.headers("gus"))
        events = parse_sse(streamed.text)
        texts = [json.loads(e["data"])["text"] for e in events if e["event"] == "log"]
        assert any("live-one" in t for t in texts) and any("live-two" in t for t in texts)
        statuses = [json.loads(e["data"])["status"] for e in events if e["event"] == "status"]
        assert statuses[-1] == "completed"
        ids = [int(e["id"]) for e in events if e["event"] == "log"]
        assert ids == list(range(1, len(ids) + 1))
    other = await w.http.get(f"/v1/builds/{build_id}/stream", headers={"X-MCP-API-Key": "mcp_" + "x" * 43})
    assert other.status_code == 401


def parse_sse(text: str) -> list[dict[str, str]]:
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            fields[name] = fields.get(name, "") + value if name == "data" else value
        if fields:
            fields.setdefault("event", "message")
            fields.setdefault("id", "")
            events.append(fields)
    return events


async def test_a_runner_killed_mid_build_is_reaped_and_two_nodes_share_the_queue(
    build_world: BuildWorld,
) -> None:
    w = build_world
    await w.user("hal", tier="pro")
    await w.set_key("hal", "hal-key-abcdef0123456789")
    node_a = await w.spawn_runner("node-a", GATEHOUSE_RUNNER_CAPACITY=1)
    node_b = await w.spawn_runner("node-b", GATEHOUSE_RUNNER_CAPACITY=1)
    first = await w.start("hal", ["sleep:120 grandchild"])
    second = await w.start("hal", ["sleep:120"])
    one = await w.session("hal", first)
    two = await w.session("hal", second)
    assert {one["node"], two["node"]} == {"node-a", "node-b"}
    victim, survivor = (one, two) if one["node"] == "node-a" else (two, one)

    async def worker_tree() -> list[int]:
        try:
            return [p.pid for p in psutil.Process(victim["pid"]).children(recursive=True)] or []
        except psutil.NoSuchProcess:
            return []

    tree = await eventually(worker_tree, timeout=15)
    killed_at = datetime.now(UTC)
    os.kill(node_a.pid, signal.SIGKILL)
    node_a.wait()

    failed = await w.ended("hal", victim["build_id"], timeout=60)
    assert failed["status"] == "failed" and failed["error"].startswith("worker lost"), failed
    reaped_after = datetime.fromisoformat(failed["finished_at"]) - killed_at
    print(f"node killed -> build failed after {reaped_after.total_seconds():.1f} s")  # the brief: within 30 s
    await eventually(lambda: _true(all(gone(pid) for pid in [victim["pid"], *tree])), timeout=15)
    still = await w.build("hal", survivor["build_id"])
    assert still["status"] == "running"

    async def one_slot_used() -> bool:
        quota = (await w.http.get("/v1/quota", headers=w.headers("hal"))).json()
        return quota["concurrent_builds_used"] == 1

    await eventually(one_slot_used, timeout=15)
    stopped = await w.http.post(f"/v1/sessions/{survivor['build_id']}/stop", headers=w.headers("hal"))
    assert stopped.json()["status"] == "canceled"
    await eventually(lambda: _true(gone(survivor["pid"])), timeout=15)
    assert node_b.poll() is None
    assert TERMINAL
