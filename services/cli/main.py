"""`gatehouse`: run the platform, one service, or operator tasks.

Every failure a user can cause ends with one readable line on stderr and a non-zero exit.
"""

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import NoReturn

from contracts.commands.identity import TIERS
from contracts.subjects import SERVICES
from services.cli.replay import instant as replay_instant
from services.cli.runtime import read_runtime
from services.kit.config import ConfigError, Settings, load_settings
from services.kit.rpc import CommandFailed

RUNNABLE = (*SERVICES, "gateway")


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end in one readable line (and exit 2), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"gatehouse: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gatehouse", description="Gatehouse, a multi-tenant MCP gateway.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    up = sub.add_parser("up", help="run the whole platform (embedded NATS and PostgreSQL by default)")
    up.add_argument(
        "--data-dir", type=Path, default=None, help="default: $GATEHOUSE_DATA_DIR or ./.gatehouse"
    )
    up.add_argument("--host", default=os.environ.get("GATEHOUSE_HTTP_HOST", "127.0.0.1"))
    up.add_argument("--port", type=int, default=int(os.environ.get("GATEHOUSE_HTTP_PORT", "8765")))

    service = sub.add_parser("service", help="run one service against the configured NATS/PostgreSQL")
    service.add_argument("name", choices=RUNNABLE)

    users = sub.add_parser("users", help="manage users").add_subparsers(dest="users_command", required=True)
    create = users.add_parser("create", help="create a user and print a new API key (shown once)")
    create.add_argument("--email", required=True)
    create.add_argument("--org")
    create.add_argument("--tier", default="free", choices=TIERS)
    create.add_argument("--admin", action="store_true")

    replay = sub.add_parser("replay", help="rebuild projections from the event log")
    replay.add_argument("target", choices=("audit", "quota", "history", "all"))
    replay.add_argument(
        "--until",
        type=replay_instant,
        metavar="TIMESTAMP",
        help="audit only: rebuild the trail as it stood then into a scratch schema (live trail untouched)",
    )

    audit = sub.add_parser("audit", help="audit trail").add_subparsers(dest="audit_command", required=True)
    audit.add_parser("verify", help="check the audit hash chains and their signed checkpoints")
    checkpoint = audit.add_parser("checkpoint", help="sign every audit chain head now, apply retention")
    checkpoint.add_argument("--no-sweep", action="store_true", help="sign only; do not apply retention")

    quota = sub.add_parser("quota", help="quota ledger").add_subparsers(dest="quota_command", required=True)
    quota.add_parser("verify", help="compare live balances with balances rebuilt from the event log")

    events = sub.add_parser("events", help="the event log").add_subparsers(
        dest="events_command", required=True
    )
    tail = events.add_parser("tail", help="print events as JSON lines")
    tail.add_argument("--subject", default="events.>")
    tail.add_argument(
        "--since", type=datetime.fromisoformat, help="ISO timestamp, e.g. 2026-11-21T10:00:00+00:00"
    )
    tail.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    tail.add_argument("--org", help="only events of this org id")
    tail.add_argument("--user", help="only events this user id caused or that are about them")

    keys = sub.add_parser("keys", help="master keys of the secrets service").add_subparsers(
        dest="keys_command", required=True
    )
    keys.add_parser("rotate", help="add a master key and make it current")
    retire = keys.add_parser("retire", help="drop a master key once nothing is wrapped under it")
    retire.add_argument("kid")
    keys.add_parser("list", help="master keys and how many data keys each wraps")
    secrets = sub.add_parser("secrets", help="stored secrets").add_subparsers(
        dest="secrets_command", required=True
    )
    secrets.add_parser("rewrap", help="re-wrap every data key under the current master key")
    return p


def _settings() -> Settings:
    """Environment first; otherwise the URLs of the platform `gatehouse up` runs in the data dir."""
    env = dict(os.environ)
    settings = load_settings(env)
    if not env.get("GATEHOUSE_NATS_URL"):
        runtime = read_runtime(settings.data_dir)
        if runtime is None:
            raise ConfigError(
                "GATEHOUSE_NATS_URL is not set and no running `gatehouse up` was found "
                f"in {settings.data_dir}"
            )
        env["GATEHOUSE_NATS_URL"] = runtime.nats_url
        env.setdefault("GATEHOUSE_DATABASE_URL", runtime.database_url)
        settings = load_settings(env)
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "replay" and args.until is not None and args.target != "audit":
        parser.error("--until works with `replay audit` only")
    try:
        return _run(args)
    except ConfigError as err:
        print(f"gatehouse: {err}", file=sys.stderr)
        return 2
    except CommandFailed as err:
        print(f"gatehouse: {err.problem.detail}", file=sys.stderr)
        return 1
    except (OSError, TimeoutError) as err:
        print(
            f"gatehouse: cannot reach the platform ({err.__class__.__name__}: {err})",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.command == "up":
        from services.cli.up import up

        data_dir = (args.data_dir or Path(os.environ.get("GATEHOUSE_DATA_DIR", ".gatehouse"))).resolve()
        return up(data_dir, args.host, args.port)
    if args.command == "service":
        import runpy

        runpy.run_module(f"services.{args.name}", run_name="__main__")
        return 0

    if args.command in ("keys", "secrets"):
        from services.cli import keys

        if args.command == "secrets":
            return keys.rewrap(_settings)
        if args.keys_command == "rotate":
            return keys.rotate(_settings)
        if args.keys_command == "retire":
            return keys.retire(_settings, args.kid)
        return keys.list_keys(_settings)

    from services.cli import operator

    settings = _settings()
    if args.command == "users":
        return operator.create_user(settings, args.email, args.org, args.tier, args.admin)
    if args.command == "replay":
        if args.until is not None:
            from services.cli.replay import audit_until

            return audit_until(settings, args.until)
        return operator.replay(settings, args.target)
    if args.command == "quota":
        return operator.quota_verify(settings)
    if args.command == "audit":
        if args.audit_command == "checkpoint":
            return operator.audit_checkpoint(settings, sweep=not args.no_sweep)
        return operator.audit_verify(settings)
    if args.command == "events":
        where = operator.TailFilter(org=args.org, user=args.user)
        return operator.events_tail(settings, args.subject, args.since, args.follow, where)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
