"""Secret values from the secrets service (`cmd.secrets.reveal`), cached for a short while.

Each reveal names its purpose (`tool_call:<request id>`) and is audited by the secrets
service. Revealing on every call would add a NATS round trip (and a decryption) to each
tool call, so values are kept in memory for `ttl_s` (default 60 s) per (user, org, name),
and dropped as soon as the secrets service reports the secret stored again or revoked
(adapters/feeds.py), so a deleted secret stops working within milliseconds, at worst
within the TTL. The audit trail therefore shows one reveal per cache fill, with the
request id of the call that caused it. Every value is registered with the log redactor.
"""

import asyncio
import time
from collections.abc import Mapping

from contracts.commands.common import CommandMeta
from contracts.commands.mcp import Caller
from contracts.commands.secrets import RevealedSecret, RevealSecret
from contracts.envelope import Actor
from services.kit.redaction import register_secret
from services.kit.rpc import CommandClient, CommandFailed
from services.mcp_proxy.application.ports import UpstreamUnavailable
from services.mcp_proxy.domain.errors import MissingSecret

ACTOR = Actor(kind="service", id="mcp_proxy")
MISSING = {404: "not_found", 410: "revoked"}
Key = tuple[str, str, str]  # (user, org, name)


class RevealingSecrets:
    def __init__(self, client: CommandClient, ttl_s: float, timeout_s: float = 5.0) -> None:
        self.client, self.ttl_s, self.timeout_s = client, ttl_s, timeout_s
        self._cache: dict[Key, tuple[float, str]] = {}
        self.reveals = 0

    async def resolve(
        self, caller: Caller, server: str, names: tuple[str, ...], request_id: str, correlation_id: str
    ) -> Mapping[str, str]:
        now = time.monotonic()
        values: dict[str, str] = {}
        missing: list[str] = []
        for name in names:
            hit = self._cache.get((caller.user_id, caller.org_id, name))
            if hit is not None and hit[0] > now:
                values[name] = hit[1]
            else:
                missing.append(name)
        if missing:
            meta = CommandMeta(actor=ACTOR, correlation_id=correlation_id)
            revealed = await asyncio.gather(
                *(self._reveal(caller, server, n, request_id, meta) for n in missing)
            )
            for name, value in zip(missing, revealed, strict=True):
                values[name] = value
                self._cache[(caller.user_id, caller.org_id, name)] = (now + self.ttl_s, value)
        return values

    async def _reveal(
        self, caller: Caller, server: str, name: str, request_id: str, meta: CommandMeta
    ) -> str:
        request = RevealSecret(
            meta=meta,
            service="mcp_proxy",
            purpose=f"tool_call:{request_id}",
            org_id=caller.org_id,
            user_id=caller.user_id,
            name=name,
        )
        try:
            secret = await self.client.call(
                "secrets", "reveal", request, RevealedSecret, timeout=self.timeout_s
            )
        except CommandFailed as failed:
            reason = MISSING.get(failed.problem.status)
            if reason is not None:
                detail = failed.problem.detail if reason == "revoked" else None
                raise MissingSecret(server, name, reason, detail) from None
            raise UpstreamUnavailable(
                f"The secret '{name}' for the server '{server}' could not be read: {failed.problem.detail}"
            ) from None
        self.reveals += 1
        register_secret(secret.value)
        return secret.value

    def invalidate(self, org_id: str | None, name: str) -> None:
        """The secret changed or was revoked: forget every cached value of that name in the org."""
        for key in [k for k in self._cache if k[2] == name and (org_id is None or k[1] == org_id)]:
            self._cache.pop(key, None)
