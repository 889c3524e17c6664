"""The agent CLI as a node runs it, the environment a build gets, and names a node may use."""

import os
import re
import shlex
from collections.abc import Mapping

from services.session_runner.domain.protocol import PromptMode

DEFAULT_AGENT_COMMAND = "cursor-agent -p --force --output-format stream-json"
_NODE_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def parse_command(raw: str) -> list[str]:
    argv = shlex.split(raw)
    if not argv:
        raise ValueError("the agent command is empty")
    return argv


def invocation(command: list[str], mode: PromptMode, prompt: str) -> tuple[list[str], bytes | None]:
    """(argv, stdin bytes): the prompt as the last argument, or on stdin."""
    if mode == "arg":
        return [*command, prompt], None
    return list(command), prompt.encode()


def build_env(
    path: str, home: str, build_id: str, user_env: Mapping[str, str], key_env: str, key: str
) -> dict[str, str]:
    """A minimal environment: no variable of the node leaks in but PATH."""
    env = {
        "PATH": path,
        "HOME": home,
        "TMPDIR": os.path.join(home, "tmp"),
        "LANG": "C.UTF-8",
        "GATEHOUSE_BUILD_ID": build_id,
    }
    env.update(user_env)  # checked by the dispatcher: no GATEHOUSE_*, LD_*, nor the key variable
    env[key_env] = key
    return env


def node_name(raw: str) -> str:
    """Usable as a NATS subject token and a KV key: `[A-Za-z0-9_-]`, at most 64 characters."""
    name = _NODE_UNSAFE.sub("_", raw.strip())[:64]
    if not name:
        raise ValueError("the node name is empty")
    return name
