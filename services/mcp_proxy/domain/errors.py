"""The refusals of mcp_proxy's rules; each message is a sentence for a human."""


class ProxyError(Exception):
    """A rule was broken."""


class Invalid(ProxyError):
    pass


class NotFound(ProxyError):
    pass


class Conflict(ProxyError):
    pass


class Forbidden(ProxyError):
    pass


class MissingSecret(ProxyError):
    """A server references a secret the caller (and their org) has not set, or it was deleted."""

    def __init__(self, server: str, name: str, reason: str = "not_found", detail: str | None = None) -> None:
        self.server, self.name, self.reason = server, name, reason
        state = "was deleted" if reason == "revoked" else "is not set"
        # The secrets service's own sentence (e.g. "revoked on …") is kept when it gave one.
        why = f": {detail.rstrip('.')}." if detail else f", which {state}."
        super().__init__(
            f"The server '{server}' needs the secret '{name}'{why} "
            f'Set it with PUT /v1/secrets/{name} {{"value": "..."}} and call again.'
        )
