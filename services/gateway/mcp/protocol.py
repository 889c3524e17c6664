"""The MCP wire as the gateway speaks it: versions, JSON-RPC messages, error codes, results.

Pure (no I/O). A message is decoded into a minimal msgspec Struct whose `params` stay raw
bytes until a method needs them; upstream results are spliced into responses as bytes,
never decoded and re-encoded.
"""

import base64
import binascii
from typing import Any, Final

import msgspec

from contracts.commands.mcp import UpstreamFeatures

# -- protocol revisions -----------------------------------------------------------------------
MODERN_VERSIONS: Final = ("2026-07-28",)  # stateless: per-request `_meta`, no session
HANDSHAKE_VERSIONS: Final = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")  # newest first
SUPPORTED_VERSIONS: Final = (*MODERN_VERSIONS, *HANDSHAKE_VERSIONS)
LATEST_HANDSHAKE: Final = HANDSHAKE_VERSIONS[0]

SERVER_NAME: Final = "gatehouse"
SERVER_VERSION: Final = "0.1.0"
INSTRUCTIONS: Final = (
    "Gatehouse gathers the caller's MCP servers behind one endpoint. Tools are named "
    "`<server>__<tool>`; each runs upstream with the caller's own credentials and quota."
)

# -- JSON-RPC and MCP error codes ---------------------------------------------------------------
PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
HEADER_MISMATCH: Final = -32020
UNSUPPORTED_PROTOCOL_VERSION: Final = -32022

# HTTP status of a JSON-RPC error in the stateless era (the spec's table); the handshake era
# answers JSON-RPC errors with 200 except for bodies that are not a usable message at all.
MODERN_ERROR_STATUS: Final = {
    PARSE_ERROR: 400,
    INVALID_REQUEST: 400,
    INVALID_PARAMS: 400,
    HEADER_MISMATCH: 400,
    UNSUPPORTED_PROTOCOL_VERSION: 400,
    METHOD_NOT_FOUND: 404,
}
HANDSHAKE_ERROR_STATUS: Final = {PARSE_ERROR: 400, INVALID_REQUEST: 400, UNSUPPORTED_PROTOCOL_VERSION: 400}

META_PROTOCOL_VERSION: Final = "io.modelcontextprotocol/protocolVersion"
META_SERVER_INFO: Final = "io.modelcontextprotocol/serverInfo"
META_LOG_LEVEL: Final = "io.modelcontextprotocol/logLevel"

Id = int | str
ABSENT: Final = msgspec.Raw(b"")  # a `msgspec.Raw` field that was not in the message


class Message(msgspec.Struct):
    """One JSON-RPC message: a request (id + method), a notification (method) or a response."""

    jsonrpc: str = ""
    id: Id | msgspec.UnsetType | None = msgspec.UNSET
    method: str | None = None
    params: msgspec.Raw = ABSENT
    result: msgspec.Raw = ABSENT
    error: msgspec.Raw = ABSENT

    @property
    def is_request(self) -> bool:
        return self.method is not None and self.id is not msgspec.UNSET

    @property
    def is_notification(self) -> bool:
        return self.method is not None and self.id is msgspec.UNSET


class RequestMeta(msgspec.Struct):
    progressToken: str | int | None = None
    protocolVersion: str | None = msgspec.field(default=None, name=META_PROTOCOL_VERSION)
    logLevel: str | None = msgspec.field(default=None, name=META_LOG_LEVEL)  # 2026-07-28 opt-in


class CallParams(msgspec.Struct):
    name: str
    arguments: msgspec.Raw = ABSENT
    meta: RequestMeta | None = msgspec.field(default=None, name="_meta")


class ListParams(msgspec.Struct):
    cursor: str | None = None
    meta: RequestMeta | None = msgspec.field(default=None, name="_meta")


# -- params of the methods forwarded to one server's upstream (checked, then sent raw) ----------
class UriParams(msgspec.Struct):
    """resources/read, resources/subscribe, resources/unsubscribe."""

    uri: str
    meta: RequestMeta | None = msgspec.field(default=None, name="_meta")


class PromptParams(msgspec.Struct):
    name: str
    arguments: dict[str, str] | None = None
    meta: RequestMeta | None = msgspec.field(default=None, name="_meta")


class CompletionRef(msgspec.Struct):
    type: str  # "ref/prompt" (with name) | "ref/resource" (with uri)
    name: str | None = None
    uri: str | None = None


class CompletionArgument(msgspec.Struct):
    name: str
    value: str


class CompleteParams(msgspec.Struct):
    ref: CompletionRef
    argument: CompletionArgument
    meta: RequestMeta | None = msgspec.field(default=None, name="_meta")


FORWARDED_PARAMS: Final[dict[str, type[Any]]] = {  # the keys are the contract's FORWARDED_METHODS
    "resources/list": ListParams,
    "resources/templates/list": ListParams,
    "resources/read": UriParams,
    "resources/subscribe": UriParams,
    "resources/unsubscribe": UriParams,
    "prompts/list": ListParams,
    "prompts/get": PromptParams,
    "completion/complete": CompleteParams,
}
LISTINGS: Final = frozenset({"resources/list", "resources/templates/list", "prompts/list"})
_decode_fields = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode


def without_meta(params: msgspec.Raw) -> bytes:
    """Params as sent minus `_meta` (the client's; the upstream gets the gateway's own session)."""
    raw = bytes(params)
    if not raw or raw == b"null":
        return b"{}"
    if b'"_meta"' not in raw:
        return raw
    fields = _decode_fields(raw)
    fields.pop("_meta", None)
    return _encoder.encode(fields)


LOG_LEVELS: Final = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")


class SetLevelParams(msgspec.Struct):
    level: str = ""
    meta: RequestMeta | None = msgspec.field(default=None, name="_meta")


class ClientCapabilities(msgspec.Struct):
    """What a client declared it answers; values are objects when declared (read loosely)."""

    sampling: Any = None
    elicitation: Any = None


class InitializeParams(msgspec.Struct):
    protocolVersion: str = ""
    capabilities: ClientCapabilities = msgspec.field(default_factory=ClientCapabilities)


def client_features(caps: ClientCapabilities) -> list[str]:
    """The server-to-client requests this client answers (contracts CLIENT_FEATURES).
    `elicitation: {}` means form mode only (2025-11-25)."""
    features = ["sampling"] if isinstance(caps.sampling, dict) else []
    if isinstance(caps.elicitation, dict):
        if "form" in caps.elicitation or "url" not in caps.elicitation:
            features.append("elicitation.form")
        if "url" in caps.elicitation:
            features.append("elicitation.url")
    return features


class ResponseError(msgspec.Struct):
    """The `error` of a JSON-RPC response a client sent."""

    code: int
    message: str = ""
    data: msgspec.Raw = ABSENT


class CancelParams(msgspec.Struct):
    requestId: Id | None = None
    reason: str | None = None


class _ResultType(msgspec.Struct):
    resultType: str | None = None


class ProtocolError(Exception):
    """A JSON-RPC error to answer with."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code, self.message, self.data = code, message, data


class _Error(msgspec.Struct, omit_defaults=True):
    code: int
    message: str
    data: Any = None


_encoder = msgspec.json.Encoder()
_message_decoder = msgspec.json.Decoder(Message)
_result_type_decoder = msgspec.json.Decoder(_ResultType)
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def decode_message(body: bytes) -> Message:
    """The message in `body`, or ProtocolError (parse error, batch, not a JSON-RPC message)."""
    start = body.lstrip()[:1]
    if start == b"[":
        raise ProtocolError(INVALID_REQUEST, "Batches are not supported: send one JSON-RPC message per POST.")
    try:
        message = _message_decoder.decode(body)
    except msgspec.ValidationError as err:
        raise ProtocolError(INVALID_REQUEST, f"Not a JSON-RPC message: {err}") from None
    except msgspec.DecodeError:
        raise ProtocolError(PARSE_ERROR, "Parse error: the body is not valid JSON.") from None
    if message.jsonrpc != "2.0":
        raise ProtocolError(INVALID_REQUEST, 'Not a JSON-RPC 2.0 message (`"jsonrpc": "2.0"` is required).')
    if message.method is None and not message.result and not message.error:
        raise ProtocolError(INVALID_REQUEST, "A JSON-RPC message needs a `method` (or a `result`/`error`).")
    if message.method is not None and message.id is None:
        raise ProtocolError(INVALID_REQUEST, "A request id must be a string or a number, not null.")
    return message


def decode_params(raw: msgspec.Raw, kind: type[Any]) -> Any:
    """`params` as `kind` (a Struct with defaults for everything optional), or INVALID_PARAMS."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(raw if raw and raw != b"null" else b"{}")
    except msgspec.DecodeError as err:
        raise ProtocolError(INVALID_PARAMS, f"Invalid params: {err}") from None


def encode_id(value: Id | msgspec.UnsetType | None) -> bytes:
    return b"null" if value is None or value is msgspec.UNSET else _encoder.encode(value)


def result(id_json: bytes, body: bytes) -> bytes:
    return b'{"jsonrpc":"2.0","id":' + id_json + b',"result":' + body + b"}"


def error(id_json: bytes, code: int, message: str, data: Any = None) -> bytes:
    return (
        b'{"jsonrpc":"2.0","id":'
        + id_json
        + b',"error":'
        + _encoder.encode(_Error(code, message, data))
        + b"}"
    )


def error_status(code: int, modern: bool) -> int:
    return (MODERN_ERROR_STATUS if modern else HANDSHAKE_ERROR_STATUS).get(code, 200)


def unsupported_version(requested: str) -> ProtocolError:
    return ProtocolError(
        UNSUPPORTED_PROTOCOL_VERSION,
        f"Unsupported protocol version {requested!r}; this server speaks {', '.join(SUPPORTED_VERSIONS)}.",
        {"supported": list(SUPPORTED_VERSIONS), "requested": requested},
    )


def negotiate(requested: str) -> str:
    """The handshake version to answer an `initialize` with (the client's if we speak it)."""
    return requested if requested in HANDSHAKE_VERSIONS else LATEST_HANDSHAKE


# -- results -----------------------------------------------------------------------------------
MODERN_FIELDS: Final = b'"resultType":"complete"'
CACHEABLE_FIELDS: Final = b'"resultType":"complete","ttlMs":0,"cacheScope":"private"'
# `logging`: the upstreams' log notifications of a call are relayed (exchange.py) from the level set.
# `tools.listChanged`: sent on a handshake session's GET stream (adapters/http/mcp_listen.py); the
# stateless era would need `subscriptions/listen`, which is not offered, so `server/discover`
# does not declare it.
_CAPABILITIES: Final = {"tools": {"listChanged": True}, "logging": {}}
_STATELESS_CAPABILITIES: Final[dict[str, Any]] = {"tools": {}, "logging": {}}


def capabilities(features: UpstreamFeatures | None = None, stateless: bool = False) -> dict[str, Any]:
    """Tools and logging; on one server's endpoint also what its upstream offers and the gateway
    forwards. Neither `listChanged` nor `subscribe` is declared for those: the upstreams'
    notifications are not relayed (docs/mcp-endpoint.md)."""
    base = _STATELESS_CAPABILITIES if stateless else _CAPABILITIES
    if features is None:
        return base
    offered: dict[str, Any] = dict(base)
    if features.resources:
        offered["resources"] = {}
    if features.prompts:
        offered["prompts"] = {}
    if features.completions:
        offered["completions"] = {}
    return offered


_SERVER_INFO: Final = {"name": SERVER_NAME, "version": SERVER_VERSION}


def instructions(server: str | None) -> str:
    """What the model is told about the endpoint: `/mcp` prefixes tool names, one server's does not."""
    if server is None:
        return INSTRUCTIONS
    return (
        f"Gatehouse serves the tools of the caller's MCP server `{server}` here, named as that server "
        "names them; each runs upstream with the caller's own credentials and quota."
    )


def initialize_result(
    version: str, server: str | None = None, features: UpstreamFeatures | None = None
) -> bytes:
    return _encoder.encode(
        {
            "protocolVersion": version,
            "capabilities": capabilities(features),
            "serverInfo": _SERVER_INFO,
            "instructions": instructions(server),
        }
    )


def discover_result(server: str | None = None, features: UpstreamFeatures | None = None) -> bytes:
    return _encoder.encode(
        {
            "supportedVersions": list(SUPPORTED_VERSIONS),
            "capabilities": capabilities(features, stateless=True),
            "instructions": instructions(server),
            "resultType": "complete",
            "ttlMs": 0,
            "cacheScope": "private",
            "_meta": {META_SERVER_INFO: _SERVER_INFO},
        }
    )


DISCOVER_RESULT: Final = discover_result()


def empty_result(modern: bool) -> bytes:
    return b"{" + MODERN_FIELDS + b"}" if modern else b"{}"


def empty_list(key: bytes, modern: bool) -> bytes:
    return b'{"' + key + b'":[]' + (b"," + CACHEABLE_FIELDS if modern else b"") + b"}"


def tools_page(tools: list[bytes], next_cursor: str | None, modern: bool) -> bytes:
    out = b'{"tools":[' + b",".join(tools) + b"]"
    if next_cursor is not None:
        out += b',"nextCursor":' + _encoder.encode(next_cursor)
    if modern:
        out += b"," + CACHEABLE_FIELDS
    return out + b"}"


def tool_error_result(text: str, modern: bool) -> bytes:
    """A CallToolResult with `isError: true`: the agent reads the sentence and can act on it."""
    body = b'{"content":[{"type":"text","text":' + _encoder.encode(text) + b'}],"isError":true'
    return body + (b"," + MODERN_FIELDS if modern else b"") + b"}"


def as_modern_result(raw: bytes, listing: bool = False) -> bytes:
    """An upstream result with the `resultType` the 2026-07-28 wire requires (added if absent),
    and for a listing the cache fields of the gateway's own lists."""
    try:
        if _result_type_decoder.decode(raw).resultType is not None:
            return raw
    except msgspec.DecodeError:
        return raw
    fields = CACHEABLE_FIELDS if listing else MODERN_FIELDS
    body = raw.strip()
    if body[1:].lstrip().startswith(b"}"):
        return b"{" + fields + b"}"
    return b"{" + fields + b"," + body[1:]


def decode_header_value(value: str | None) -> str | None:
    """`Mcp-Name` as sent: plain, or `=?base64?…?=` for values that are not header-safe."""
    if value is None or not (value.startswith("=?base64?") and value.endswith("?=")):
        return value
    payload = value[len("=?base64?") : -2]
    try:
        return base64.b64decode(payload, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
