"""Composition root of a runner node: the queue, the workers, heartbeats, log sink, commands."""

from services.kit.buildbus import heartbeat_bucket
from services.kit.bus import Bus
from services.kit.config import Settings
from services.kit.host import Component, add_ping
from services.kit.rpc import CommandClient, CommandServer
from services.session_runner.adapters.commands import routes
from services.session_runner.adapters.dispatcher import DispatcherClient, SecretsKeys
from services.session_runner.adapters.heartbeats import Heartbeats
from services.session_runner.adapters.janitor import Janitor
from services.session_runner.adapters.logsink import StreamLogSink
from services.session_runner.adapters.queue import OrderQueue
from services.session_runner.adapters.workers import ProcessWorkers
from services.session_runner.application import Runner
from services.session_runner.config import load_runner_settings


async def build(bus: Bus, settings: Settings) -> list[Component]:
    config = load_runner_settings(settings.data_dir, settings.instance)
    config.logs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    config.builds_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    client = CommandClient(bus)
    runner = Runner(
        config, DispatcherClient(client), SecretsKeys(client), ProcessWorkers(), StreamLogSink(bus)
    )
    kv = await heartbeat_bucket(bus, config.heartbeat_ttl_s)
    heartbeats = Heartbeats(kv, runner, config.heartbeat_every_s)
    runner.on_change = heartbeats.nudge
    server = CommandServer(bus, "session_runner")
    add_ping(server, settings)
    routes(server, runner)
    queue = OrderQueue(bus, runner, shutdown_grace_s=config.limits.kill_grace_s + 3)
    return [Janitor(runner), heartbeats, server, queue]
