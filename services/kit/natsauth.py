"""NATS users and permissions: one user per service, and only two may ask for a reveal.

Every service connects as its own user with its own inbox prefix (`_INBOX_<user>`). The
rules guard the two paths a secret value travels, and leave the rest of the platform's
subjects open (services add subjects often; a wall that must list them all breaks instead):

- only `mcp_proxy` and `session_runner` may publish `cmd.secrets.reveal`;
- only `secrets` may subscribe to `cmd.secrets.>` (where `put` carries a value) and publish
  `events.secrets.>` (no one can forge its facts);
- no user may subscribe to another user's inbox (where a reveal's reply arrives);
- only `mcp_proxy` may publish, and only `gateway` subscribe to, `mcp.notify.>` (a tool
  call's progress and log notifications and the upstream's sampling/elicitation requests,
  which carry what the upstream says to one user); the other way, only `gateway` may publish,
  and only `mcp_proxy` subscribe to, `mcp.answer.>` (the client's answers to those requests);
- likewise only `mcp_proxy` may publish, and only `gateway` subscribe to, `mcp.tools_changed.>`
  (an upstream's own tools/list_changed for one user: a forged one would make that user's
  clients list again, a heard one tells which servers a user runs).

`operator` is the CLI. `gatehouse up` renders this into its embedded NATS server's
configuration, with a password per user kept in `<data dir>/keys/nats-<user>` (0600);
infra/nats/authorization.conf.example is the production counterpart (docs/secrets.md).
"""

import json
from pathlib import Path

from contracts.subjects import MCP_ANSWERS, MCP_NOTICES, MCP_TOOLS_CHANGED, command

OPERATOR = "operator"
SERVICE_USERS = (
    "identity",
    "audit",
    "secrets",
    "quota",
    "dispatcher",
    "session_runner",
    "mcp_proxy",
    "gateway",
)
USERS = (*SERVICE_USERS, OPERATOR)
REVEAL_SUBJECT = command("secrets", "reveal")
REVEALERS = ("mcp_proxy", "session_runner")
_CONNECTION_USERS = {"cli": OPERATOR}  # `bus.connect` names that are not service names
SECRETS = "secrets"
NOTICE_PUBLISHER, NOTICE_READER = "mcp_proxy", "gateway"


def user_for(connection_name: str) -> str:
    return _CONNECTION_USERS.get(connection_name, connection_name)


def inbox_prefix(user: str) -> str:
    return f"_INBOX_{user}"


def permissions(user: str) -> dict[str, object]:
    publish_deny = [] if user in REVEALERS else [REVEAL_SUBJECT]
    subscribe_deny = [f"{inbox_prefix(other)}.>" for other in USERS if other != user]
    if user != SECRETS:
        publish_deny.append("events.secrets.>")
        subscribe_deny.append("cmd.secrets.>")
    if user != NOTICE_PUBLISHER:
        publish_deny += [MCP_NOTICES, MCP_TOOLS_CHANGED]
        subscribe_deny.append(MCP_ANSWERS)
    if user != NOTICE_READER:
        subscribe_deny += [MCP_NOTICES, MCP_TOOLS_CHANGED]
        publish_deny.append(MCP_ANSWERS)
    publish: dict[str, list[str]] = {"allow": [">"]}
    if publish_deny:
        publish["deny"] = publish_deny
    return {"publish": publish, "subscribe": {"allow": [">"], "deny": subscribe_deny}}


def authorization_config(passwords: dict[str, str]) -> str:
    """The `authorization { users = [...] }` block for these users (JSON values are valid NATS conf)."""
    lines = ["authorization {", "  users = ["]
    for user, password in passwords.items():
        entry = {"user": user, "password": password, "permissions": permissions(user)}
        lines.append(f"    {json.dumps(entry)}")
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def password_file(data_dir: Path, user: str) -> Path:
    return data_dir / "keys" / f"nats-{user}"


def credentials(
    nats_user: str | None, nats_password: str | None, data_dir: Path, connection_name: str
) -> tuple[str, str] | None:
    """GATEHOUSE_NATS_USER/PASSWORD when set; else this process's file in the data dir, if any."""
    if nats_user:
        return nats_user, nats_password or ""
    user = user_for(connection_name)
    path = password_file(data_dir, user)
    try:
        return user, path.read_text().strip()
    except OSError:
        return None
