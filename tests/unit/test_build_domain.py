"""Builds without I/O: what may be asked for, the lifecycle, the public facts, output lines."""

import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from contracts.commands.builds import MAX_PROMPT_BYTES, MAX_PROMPTS
from contracts.events import builds as ev
from services.dispatcher.adapters.outbox import translate
from services.dispatcher.domain import AGENTS, Build, Conflict, Invalid, check_request
from services.session_runner.adapters.janitor import sweep
from services.session_runner.domain.agent import build_env, invocation, node_name
from services.session_runner.domain.lines import LineSplitter
from services.session_runner.domain.outcomes import exit_code_of, launch_failure, step_outcome

pytestmark = pytest.mark.unit

AT = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
META: dict[str, Any] = {"actor": {"kind": "user", "id": "u-1"}, "correlation_id": "c-1"}


def new_build(prompts: list[str] | None = None) -> Build:
    return Build(
        build_id=str(uuid.uuid4()),
        user_id="u-1",
        org_id="o-1",
        agent="cursor",
        prompts=prompts or ["first", "second"],
        env={"FOO": "secret-ish value"},
        queued_at=AT,
        meta=META,
    )


def step(index: int, status: str = "completed", code: int | None = 0) -> dict[str, Any]:
    return {
        "index": index,
        "status": status,
        "exit_code": code,
        "duration_ms": 12,
        "started_at": AT,
        "finished_at": AT + timedelta(seconds=1),
        "error": None if status == "completed" else f"step {index + 1} failed",
    }


# -- requests ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("prompts", "agent", "env", "message"),
    [
        ([], "cursor", {}, "at least one prompt"),
        (["x"] * (MAX_PROMPTS + 1), "cursor", {}, f"at most {MAX_PROMPTS} prompts"),
        (["x" * (MAX_PROMPT_BYTES + 1)], "cursor", {}, f"at most {MAX_PROMPT_BYTES} bytes"),
        (["ok", "   "], "cursor", {}, "prompt 2 is empty"),
        (["ok"], "copilot", {}, "unknown agent 'copilot'"),
        (["ok"], "cursor", {"CURSOR_API_KEY": "x"}, "cannot be overridden"),
        (["ok"], "cursor", {"GATEHOUSE_DATA_DIR": "/"}, "cannot be overridden"),
        (["ok"], "cursor", {"LD_PRELOAD": "/evil.so"}, "cannot be overridden"),
        (["ok"], "cursor", {"1BAD": "x"}, "not a valid environment variable name"),
    ],
)
def test_bad_requests_are_refused_with_a_sentence(
    prompts: list[str], agent: str, env: dict[str, str], message: str
) -> None:
    with pytest.raises(Invalid, match=message):
        check_request(prompts, agent, env)


def test_a_good_request_names_its_agent_and_key() -> None:
    agent = check_request(["do it"], "cursor", {"DEBUG": "1"})
    assert (agent.key_name, agent.key_env) == ("cursor_api_key", "CURSOR_API_KEY")
    assert agent.missing_key_sentence() == (
        "Cursor API key not configured for this user. Please add your API key in Settings."
    )


# -- lifecycle ---------------------------------------------------------------------------------------
def test_a_build_runs_its_steps_and_completes() -> None:
    build = new_build()
    assert build.status == "queued"
    assert build.claim("node-a", AT, META) == (True, None)
    assert build.claim("node-a", AT, META) == (True, None)  # the node asked again: fine
    assert build.claim("node-b", AT, META)[0] is False
    assert build.attach("node-a", 4242, META)
    assert build.record_step("node-a", step(0), META)
    assert build.record_step("node-a", step(0), META)  # reported twice: recorded once
    assert len(build.steps) == 1
    with pytest.raises(Invalid, match="all 2 steps"):
        build.finish("completed", 0, None, AT, 10, META, node="node-a")
    build.record_step("node-a", step(1), META)
    assert build.finish("completed", 0, None, AT, 10, META, node="node-a")
    assert (build.status, build.exit_code, build.pid, build.log_lines) == ("completed", 0, 4242, 10)
    assert not build.cancel(AT, META)  # the first verdict stands
    assert build.status == "completed"


def test_steps_come_in_order_and_only_from_the_builds_node() -> None:
    build = new_build()
    build.claim("node-a", AT, META)
    with pytest.raises(Invalid, match="out of order"):
        build.record_step("node-a", step(1), META)
    assert build.record_step("node-b", step(0), META) is False
    with pytest.raises(Conflict):
        build.finish("failed", 1, "boom", AT, 0, META, node="node-b")


def test_a_queued_build_can_be_canceled_and_then_not_claimed() -> None:
    build = new_build()
    assert build.cancel(AT, META)
    assert build.status == "canceled"
    assert build.cancel(AT, META) is False  # idempotent
    go, reason = build.claim("node-a", AT, META)
    assert go is False and reason == "the build is canceled"


def test_a_lost_worker_fails_the_build_once() -> None:
    build = new_build()
    build.claim("node-a", AT, META)
    assert build.lose(AT, META, "worker lost: no heartbeat")
    assert (build.status, build.error) == ("failed", "worker lost: no heartbeat")
    assert build.lose(AT, META) is False
    assert build.attach("node-a", 1, META) is False  # the node is told to stop


def test_a_failure_without_words_gets_some() -> None:
    build = new_build()
    build.claim("node-a", AT, META)
    build.finish("failed", 3, None, AT, 0, META)
    assert build.error == "the build failed"


# -- public facts -----------------------------------------------------------------------------------
def test_facts_carry_no_prompt_env_value_or_output() -> None:
    build = new_build(["write the secret plan"])
    build.claim("node-a", AT, META)
    build.attach("node-a", 99, META)
    build.record_step("node-a", step(0, "failed", 2), META)
    build.finish("failed", 2, "step 1 failed with exit code 2", AT, 5, META, node="node-a")
    outgoing = [translate(e) for e in build.collect_events()]
    payloads = [o.payload for o in outgoing if o is not None]
    assert [type(p) for p in payloads] == [
        ev.BuildQueued,
        ev.BuildStarted,
        ev.BuildStepFinished,
        ev.BuildFailed,
    ]
    text = b"".join(msgspec.json.encode(p) for p in payloads).decode()
    assert "secret plan" not in text and "secret-ish value" not in text
    queued, started, stepped, failed = payloads
    assert isinstance(queued, ev.BuildQueued) and queued.env_names == ["FOO"] and queued.prompts == 1
    assert isinstance(started, ev.BuildStarted) and started.node == "node-a" and started.user_id == "u-1"
    assert isinstance(stepped, ev.BuildStepFinished) and stepped.outcome == "failure"
    assert stepped.build_step_id == f"{build.id}:0"
    assert isinstance(failed, ev.BuildFailed) and failed.steps == 1 and failed.log_lines == 5
    assert [o.org_id for o in outgoing if o is not None] == ["o-1"] * 4
    assert outgoing[2] is None  # the worker's pid is bookkeeping, not a fact


# -- a runner node's rules ---------------------------------------------------------------------------
def redact_canary(text: str) -> str:
    return text.replace("CANARY-SECRET-VALUE", "[REDACTED]")


def test_a_secret_cut_between_chunks_is_still_redacted() -> None:
    splitter = LineSplitter(redact_canary)
    assert splitter.feed(b"key=CANARY-SEC") == []
    assert splitter.feed(b"RET-VALUE!\nnext") == ["key=[REDACTED]!"]
    assert splitter.flush() == ["next"]


def test_a_long_line_is_cut_without_letting_a_secret_through() -> None:
    splitter = LineSplitter(redact_canary, max_line=64, keep=32)
    out: list[str] = []
    data = ("a" * 50 + "CANARY-SECRET-VALUE" + "b" * 50).encode()
    for i in range(0, len(data), 7):
        out += splitter.feed(data[i : i + 7])
    out += splitter.flush()
    joined = "".join(out)
    assert "CANARY" not in joined and "[REDACTED]" in joined
    assert all(len(line) <= 64 for line in out)


def test_a_character_cut_in_two_is_joined_again() -> None:
    splitter = LineSplitter(lambda s: s)
    raw = "héllo wörld\n".encode()
    lines: list[str] = []
    for byte in raw:
        lines += splitter.feed(bytes([byte]))
    assert lines == ["héllo wörld"]


def test_outcomes_read_like_sentences() -> None:
    assert step_outcome(0, 0, None) == ("completed", None)
    assert step_outcome(1, 3, None) == ("failed", "step 2 failed with exit code 3")
    assert step_outcome(0, -9, None) == ("failed", "step 1 was killed by SIGKILL")
    assert step_outcome(0, -15, "canceled") == ("canceled", None)
    assert step_outcome(0, -15, "step_timeout", "5 s") == ("failed", "step 1 exceeded its time limit of 5 s")
    assert exit_code_of(-9) == 137 and exit_code_of(2) == 2
    code, why = launch_failure(0, "cursor-agent", "node-a", FileNotFoundError(2, "No such file"))
    assert code == 127 and "`cursor-agent` was not found on node node-a" in why


def test_the_agent_gets_a_minimal_environment_with_its_key() -> None:
    env = build_env("/usr/bin", "/data/builds/b1", "b1", {"DEBUG": "1"}, "CURSOR_API_KEY", "k-123")
    assert env == {
        "PATH": "/usr/bin",
        "HOME": "/data/builds/b1",
        "TMPDIR": "/data/builds/b1/tmp",
        "LANG": "C.UTF-8",
        "GATEHOUSE_BUILD_ID": "b1",
        "DEBUG": "1",
        "CURSOR_API_KEY": "k-123",
    }
    assert invocation(["agent", "-p"], "arg", "hi") == (["agent", "-p", "hi"], None)
    assert invocation(["agent", "-p"], "stdin", "hi") == (["agent", "-p"], b"hi")
    assert node_name("host.example.com-123") == "host_example_com-123"
    assert set(AGENTS) == {"cursor"}


def test_the_janitor_deletes_only_old_files_of_ended_builds(tmp_path: Path) -> None:
    logs, builds = tmp_path / "logs", tmp_path / "builds"
    logs.mkdir()
    builds.mkdir()
    now = time.time()
    for name, age in (("old", 10 * 86400), ("new", 60), ("active", 10 * 86400)):
        for suffix in (".out.log", ".err.log"):
            path = logs / f"{name}{suffix}"
            path.write_text("x")
            os.utime(path, (now - age, now - age))
        (builds / name).mkdir()
        os.utime(builds / name, (now - age, now - age))
    removed = sweep(logs, builds, 7 * 86400, {"active"}, now)
    assert removed == 3
    assert sorted(p.name for p in logs.iterdir()) == [
        "active.err.log",
        "active.out.log",
        "new.err.log",
        "new.out.log",
    ]
    assert sorted(p.name for p in builds.iterdir()) == ["active", "new"]
