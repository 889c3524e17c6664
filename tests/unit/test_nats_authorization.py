"""The NATS rules: who may reveal, who may listen where; the production example says the same."""

import json
from pathlib import Path

import pytest

from services.kit import natsauth

pytestmark = pytest.mark.unit

EXAMPLE = Path(__file__).resolve().parents[2] / "infra" / "nats" / "authorization.conf.example"


def test_only_mcp_proxy_and_session_runner_may_publish_the_reveal_subject() -> None:
    for user in natsauth.USERS:
        denied = natsauth.permissions(user)["publish"].get("deny", [])  # type: ignore[attr-defined]
        assert (natsauth.REVEAL_SUBJECT in denied) == (user not in ("mcp_proxy", "session_runner")), user


def test_only_secrets_hears_its_commands_and_no_one_reads_anothers_inbox() -> None:
    for user in natsauth.USERS:
        denied = natsauth.permissions(user)["subscribe"]["deny"]  # type: ignore[index]
        assert ("cmd.secrets.>" in denied) == (user != "secrets")
        others = {f"_INBOX_{u}.>" for u in natsauth.USERS if u != user}
        assert others <= set(denied) and f"_INBOX_{user}.>" not in denied


@pytest.mark.parametrize("subject", ["mcp.notify.>", "mcp.tools_changed.>"])
def test_only_mcp_proxy_publishes_and_only_the_gateway_hears_call_notifications(subject: str) -> None:
    for user in natsauth.USERS:
        rules = natsauth.permissions(user)
        assert (subject in rules["publish"].get("deny", [])) == (user != "mcp_proxy"), user  # type: ignore[attr-defined]
        assert (subject in rules["subscribe"]["deny"]) == (user != "gateway"), user  # type: ignore[index]


def test_the_rendered_block_names_every_user_with_its_password() -> None:
    block = natsauth.authorization_config({u: f"pw-{u}" for u in natsauth.USERS})
    for user in natsauth.USERS:
        assert f'"user": "{user}", "password": "pw-{user}"' in block


def test_the_production_example_carries_the_same_rules() -> None:
    text = EXAMPLE.read_text()
    for user in natsauth.USERS:
        rules = natsauth.permissions(user)
        section = text.split(f'user: "{user}"', 1)[1].split("}\n    }", 1)[0]
        assert json.dumps(rules["subscribe"]["deny"]) in section, user  # type: ignore[index]
        publish_deny = rules["publish"].get("deny")  # type: ignore[attr-defined]
        if publish_deny:
            assert json.dumps(publish_deny) in section, user
        else:
            assert 'publish: { allow: [">"] }' in section, user


def test_connections_find_their_own_password_in_the_data_dir(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "nats-operator").write_text("op-secret\n")
    (keys / "nats-gateway").write_text("gw-secret\n")
    assert natsauth.credentials(None, None, tmp_path, "cli") == ("operator", "op-secret")
    assert natsauth.credentials(None, None, tmp_path, "gateway") == ("gateway", "gw-secret")
    assert natsauth.credentials(None, None, tmp_path, "identity") is None  # no file: no auth
    assert natsauth.credentials("mcp_proxy", "x", tmp_path, "gateway") == ("mcp_proxy", "x")  # env wins
