"""Forwarded requests (resources, prompts, completions): which are allowed, what each needs
from the upstream, and the fact a recorded one leaves.

Only methods of FORWARDED_METHODS reach an upstream, and only when its initialize result
declared the feature the method belongs to. Otherwise a listing is answered with an empty
list (as for a server that has none) and anything else with -32601, without asking it.

Reads, prompt fetches and subscriptions are recorded (one `UpstreamRequest` event each,
batched like tool calls) with a digest and sizes of the params, never their content (a
resource URI or a prompt argument may carry anything). Listings and completions are not:
like tools/list they only look, and completions come per keystroke.
"""

from datetime import datetime
from typing import Any, Final

import msgspec
from eventsourcing.domain import Aggregate, event

from contracts.commands.mcp import UpstreamFeatures

NEEDS: Final[dict[str, str]] = {  # the keys are the contract's FORWARDED_METHODS
    "resources/list": "resources",
    "resources/templates/list": "resources",
    "resources/read": "resources",
    "resources/subscribe": "subscribe",
    "resources/unsubscribe": "subscribe",
    "prompts/list": "prompts",
    "prompts/get": "prompts",
    "completion/complete": "completions",
}

EMPTY_LISTS: Final[dict[str, bytes]] = {
    "resources/list": b'{"resources":[]}',
    "resources/templates/list": b'{"resourceTemplates":[]}',
    "prompts/list": b'{"prompts":[]}',
}
RECORDED: Final = frozenset({"resources/read", "prompts/get", "resources/subscribe", "resources/unsubscribe"})


def offered(features: UpstreamFeatures, method: str) -> bool:
    feature = NEEDS.get(method)
    return feature is not None and bool(getattr(features, feature))


class _Resources(msgspec.Struct):
    subscribe: bool = False


class _Capabilities(msgspec.Struct):
    resources: _Resources | None = None
    prompts: dict[str, Any] | None = None
    completions: dict[str, Any] | None = None


class _InitializeResult(msgspec.Struct):
    capabilities: _Capabilities = msgspec.field(default_factory=_Capabilities)


_decode_initialize = msgspec.json.Decoder(_InitializeResult).decode


def features_of(initialize_result: bytes) -> UpstreamFeatures:
    """The features an upstream's initialize result declares (none if it is not readable)."""
    try:
        caps = _decode_initialize(initialize_result).capabilities
    except (msgspec.DecodeError, msgspec.ValidationError):
        return UpstreamFeatures()
    return UpstreamFeatures(
        resources=caps.resources is not None,
        subscribe=caps.resources is not None and caps.resources.subscribe,
        prompts=caps.prompts is not None,
        completions=caps.completions is not None,
    )


class RequestRecord(msgspec.Struct, kw_only=True):
    request_id: str
    user_id: str
    org_id: str
    server: str
    method: str
    status: str  # "success" | "error" | "timeout"
    duration_ms: float
    params_sha256: str
    params_bytes: int
    result_bytes: int
    started_at: datetime
    error: str | None
    meta: dict[str, Any]


class UpstreamRequest(Aggregate):
    @event("Completed")
    def __init__(
        self,
        request_id: str,
        user_id: str,
        server: str,
        method: str,
        status: str,
        duration_ms: float,
        params_sha256: str,
        params_bytes: int,
        result_bytes: int,
        started_at: datetime,
        error: str | None,
        meta: dict[str, Any],
    ) -> None:
        pass  # nothing is read back: the event is the record

    @classmethod
    def of(cls, r: RequestRecord) -> "UpstreamRequest":
        return cls(
            request_id=r.request_id,
            user_id=r.user_id,
            server=r.server,
            method=r.method,
            status=r.status,
            duration_ms=r.duration_ms,
            params_sha256=r.params_sha256,
            params_bytes=r.params_bytes,
            result_bytes=r.result_bytes,
            started_at=r.started_at,
            error=r.error,
            meta={**r.meta, "org_id": r.org_id},
        )
