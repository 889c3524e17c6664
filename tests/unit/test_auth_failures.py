"""Refused authentications: which are reported one by one, and what a flood is folded into.
Also the `gatehouse events tail` filters."""

from datetime import UTC, datetime

import pytest

from contracts.envelope import Actor, Envelope, payload_bytes
from services.cli.operator import TailFilter, tail_subject
from services.gateway.adapters.http.auth import key_prefix
from services.gateway.auth_failures import Failure, FailureThrottle
from services.kit.config import ConfigError


def failure(ip: str = "203.0.113.7", prefix: str | None = "mcp_abcd1234") -> Failure:
    return Failure(ip=ip, reason="unknown", key_prefix=prefix)


def test_first_failures_of_a_source_are_reported_then_summarised() -> None:
    throttle = FailureThrottle(window_s=60, per_source=3)
    admitted = [throttle.admit(failure(), now=1.0) for _ in range(50)]
    assert admitted == [True] * 3 + [False] * 47
    assert throttle.admit(failure(ip="198.51.100.1"), now=2.0)  # another source has its own budget
    assert throttle.close(now=30.0) == []  # the window is still open
    (summary,) = throttle.close(now=61.0)
    assert summary.attempts == 47 and summary.last is not None and summary.last.ip == "203.0.113.7"
    assert "47 further authentication failures from 203.0.113.7 with key mcp_abcd1234" in summary.sentence(60)
    assert throttle.window_end is None and throttle.admit(failure(), now=62.0)  # a new window


def test_a_flood_from_many_sources_is_bounded() -> None:
    throttle = FailureThrottle(window_s=60, per_source=5, overall=10, max_sources=100, max_summaries=3)
    reported = sum(throttle.admit(failure(ip=f"10.0.{i // 250}.{i % 250}"), now=1.0) for i in range(5000))
    assert reported == 10
    summaries = throttle.close(now=61.0)
    assert len(summaries) <= 4
    assert sum(s.attempts for s in summaries) == 5000 - 10
    overall = summaries[-1]
    assert overall.last is None and "sources" in overall.sentence(60)


def test_only_the_public_prefix_of_a_key_is_kept() -> None:
    key = "mcp_" + "x" * 43
    assert key_prefix(key) == key[:12]
    assert key_prefix("ghp_someoneelsessecret") is None


def envelope(org: str | None, actor: str, data: dict[str, object]) -> Envelope:
    return Envelope(
        event_id="e",
        type="identity.api_key_issued",
        schema_version=1,
        occurred_at=datetime(2026, 11, 21, tzinfo=UTC),
        org_id=org,
        actor=Actor(kind="user", id=actor),
        correlation_id="c",
        data=payload_bytes(data),
    )


def test_tail_filters_by_org_and_user() -> None:
    by_ann = envelope("alpha", "ann", {})
    about_ann = envelope("alpha", "admin", {"user_id": "ann"})
    other = envelope("beta", "bob", {"user_id": "bob"})
    assert [TailFilter(org="alpha").keeps(e) for e in (by_ann, about_ann, other)] == [True, True, False]
    assert [TailFilter(user="ann").keeps(e) for e in (by_ann, about_ann, other)] == [True, True, False]
    assert not TailFilter(org="beta", user="ann").keeps(by_ann)


@pytest.mark.parametrize(
    "subject", ["events.>", "events.identity.>", "events.gateway.auth_failed", "events.*.x"]
)
def test_tail_accepts_stream_subjects(subject: str) -> None:
    assert tail_subject(subject) == subject


@pytest.mark.parametrize(
    "subject", ["identity.>", "events..x", "events.>.x", "cmd.audit.query", "events.a b"]
)
def test_tail_refuses_other_subjects(subject: str) -> None:
    with pytest.raises(ConfigError, match="not a subject of the event stream"):
        tail_subject(subject)


def test_tail_with_a_bad_subject_or_time_ends_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from services.cli.main import main

    monkeypatch.setenv("GATEHOUSE_NATS_URL", "nats://127.0.0.1:1")  # never reached
    assert main(["events", "tail", "--subject", "identity.>", "--org", "alpha"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a subject of the event stream" in err[0]
    with pytest.raises(SystemExit) as exited:
        main(["events", "tail", "--since", "last tuesday"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--since" in err[0]
