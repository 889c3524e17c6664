"""The secrets service's commands on NATS: decode, run the handler in a worker thread, reply.

Refusals are Problems whose `detail` names the secret and never carries its value. A reveal
that is refused is recorded as a `reveal_denied` fact; one that succeeds as `secret_revealed`.
"""

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import msgspec

from contracts.commands import secrets as cmd
from contracts.commands.common import CommandMeta, Empty
from services.kit.rpc import CommandFailed, CommandServer, refuse
from services.secrets.adapters.keystore import KeyRow
from services.secrets.adapters.reveal_log import RevealLog
from services.secrets.application import Denial, NeedsLoad, Reveal, RevealRequest, SecretInfo, Secrets
from services.secrets.domain import (
    Invalid,
    KeyUnavailable,
    NotFound,
    Refused,
    Revoked,
    SecretsError,
    Unreadable,
)

T = TypeVar("T")


class KeyReader(Protocol):
    async def live(self, secret_ids: list[str]) -> list[KeyRow]: ...


# (status, title, code) of each refusal. A revoked secret is 410 Gone when used, and 404 when
# its metadata is asked for (revoked secrets are not listed either).
_PROBLEMS: list[tuple[type[SecretsError], int, str, str]] = [
    (NotFound, 404, "Not found", "secret_not_found"),
    (Revoked, 410, "Secret revoked", "secret_revoked"),
    (Invalid, 400, "Invalid request", "invalid_secret"),
    (Refused, 403, "Reveal refused", "reveal_refused"),
    (Unreadable, 422, "Secret unreadable", "secret_corrupted"),
    (KeyUnavailable, 503, "Master key unavailable", "master_key_missing"),
]
_REASONS = {
    "secret_not_found": "not_found",
    "secret_revoked": "revoked",
    "invalid_secret": "invalid",
    "reveal_refused": "refused",
    "secret_corrupted": "corrupted",
    "master_key_missing": "key_unavailable",
}


def meta_dict(meta: CommandMeta) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(meta)
    return out


def refusal(err: SecretsError) -> CommandFailed:
    for kind, status, title, code in _PROBLEMS:
        if isinstance(err, kind):
            return refuse(status, title, str(err), code)
    return refuse(400, "Refused", str(err), "secret_refused")


async def _run(fn: Callable[..., T], *args: Any) -> T:
    try:
        return await asyncio.to_thread(fn, *args)
    except SecretsError as err:
        raise refusal(err) from None


def view(info: SecretInfo) -> cmd.SecretView:
    s = info.secret
    assert s.first_stored_at is not None and s.stored_at is not None  # only stored secrets are shown
    return cmd.SecretView(
        name=s.name,
        scope=s.scope,
        fingerprint=s.fingerprint,
        key_id=info.kid,
        version=s.value_version,
        created_at=s.first_stored_at,
        updated_at=s.stored_at,
        last_used_at=info.last_used_at,
    )


def routes(server: CommandServer, app: Secrets, reveals: RevealLog, keys: KeyReader) -> None:
    async def put(c: cmd.PutSecret) -> cmd.SecretView:
        return view(await _run(app.put, c.org_id, c.user_id, c.scope, c.name, c.value, meta_dict(c.meta)))

    async def list_(c: cmd.ListSecrets) -> cmd.SecretList:
        return cmd.SecretList([view(i) for i in await _run(app.listing, c.org_id, c.user_id, c.scope)])

    async def get(c: cmd.GetSecret) -> cmd.SecretView:
        try:
            return view(await asyncio.to_thread(app.info, c.org_id, c.user_id, c.scope, c.name))
        except Revoked as err:  # not listed any more, so not found (the sentence says why)
            raise refuse(404, "Not found", str(err), "secret_revoked") from None
        except SecretsError as err:
            raise refusal(err) from None

    async def delete(c: cmd.DeleteSecret) -> Empty:
        await _run(app.revoke, c.org_id, c.user_id, c.scope, c.name, meta_dict(c.meta))
        return Empty()

    async def reveal(c: cmd.RevealSecret) -> cmd.RevealedSecret:
        ask = RevealRequest(c.service, c.purpose, c.org_id, c.user_id, c.name, c.scope)
        meta = meta_dict(c.meta)
        try:
            live = await keys.live(app.candidates(ask))  # fresh: a revocation anywhere shows at once
            try:
                sealing, value = app.reveal_from(ask, live, load=False)  # cached: no I/O, microseconds
            except NeedsLoad:
                sealing, value = await asyncio.to_thread(app.reveal_from, ask, live, True)
        except SecretsError as err:
            problem = refusal(err)
            reason = _REASONS.get(problem.problem.code, "refused")
            reveals.denied(Denial(ask, reason, datetime.now(UTC), meta))
            raise problem from None
        reveals.revealed(Reveal(sealing, ask, datetime.now(UTC), meta))
        return cmd.RevealedSecret(
            name=sealing.name, scope=sealing.scope, version=sealing.version, value=value.decode()
        )

    async def rewrap(c: cmd.Rewrap) -> cmd.RewrapReport:
        done = await _run(app.rewrap_all, meta_dict(c.meta))
        return cmd.RewrapReport(
            key_id=done.kid,
            rewrapped=done.rewrapped,
            already_current=done.already_current,
            from_key_ids=done.moved,
            unreadable=done.unreadable,
            seconds=done.seconds,
        )

    async def key_status(c: cmd.KeyStatus) -> cmd.KeyReport:
        if c.reload:
            await _run(app.reload_keys)
        usage = await _run(app.key_usage)
        current = app.keyring.current.kid
        keys = [
            cmd.KeyUsage(key_id=kid, data_keys=n, current=kid == current, known=known, secrets=names)
            for kid, n, known, names in usage
        ]
        if current not in {k.key_id for k in keys}:
            keys.insert(0, cmd.KeyUsage(key_id=current, data_keys=0, current=True, known=True))
        held = [k for k in app.keyring.kids if k not in {u.key_id for u in keys}]
        keys += [cmd.KeyUsage(key_id=k, data_keys=0, current=False, known=True) for k in held]
        return cmd.KeyReport(current_key_id=current, keys=keys)

    server.route("put", cmd.PutSecret, put)
    server.route("list", cmd.ListSecrets, list_)
    server.route("get", cmd.GetSecret, get)
    server.route("delete", cmd.DeleteSecret, delete)
    server.route(cmd.REVEAL_VERB, cmd.RevealSecret, reveal)
    server.route("rewrap", cmd.Rewrap, rewrap)
    server.route("key_status", cmd.KeyStatus, key_status)
