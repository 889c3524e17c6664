"""A runner node's commands: `cmd.session_runner.ping` (any node) and
`cmd.session_runner.stop.<node>` (this node only)."""

from contracts.commands import builds as cmd
from services.kit.rpc import CommandServer
from services.session_runner.application import Runner


def routes(server: CommandServer, runner: Runner) -> None:
    async def stop(c: cmd.StopSession) -> cmd.Stopping:
        return cmd.Stopping(found=runner.stop(c.build_id, c.reason))

    server.route(cmd.stop_verb(runner.node), cmd.StopSession, stop)
