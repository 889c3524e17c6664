"""An upstream's requests to the MCP client during a tool call (sampling, elicitation), and the
ids that route the client's answers back. Pure (no I/O).

mcp_proxy publishes such a request on the call's notice subject with the call's own counter
as id (contracts ClientRequest). The client must not see that id, nor may its answer be
trusted to name a call: the gateway gives it an id of its own,

    gh.<request id>.<seq>.<mac>

where the MAC (HMAC-SHA256 under a key derived from GATEHOUSE_KEY_PEPPER, which every replica
has) binds the request id and counter to the user and the session the call runs in. A
response POSTed to any replica is routed by reading the id back (`open`): one that was not
made for this user and session, forged or garbled, is refused before anything is sent.
"""

import base64
import hashlib
import hmac
from typing import Final, NamedTuple

import msgspec

from contracts.commands.mcp import ClientRequest

PREFIX: Final = "gh"
_MAC_CHARS: Final = 22  # 128 bits, URL-safe base64
_decode_request = msgspec.json.Decoder(ClientRequest).decode
_encoder = msgspec.json.Encoder()


class _Head(msgspec.Struct):
    id: int | str | None = None


_decode_head = msgspec.json.Decoder(_Head).decode


class AskRoute(NamedTuple):
    request_id: str
    seq: int


class AskIds:
    def __init__(self, pepper: bytes) -> None:
        self._key = hmac.new(pepper, b"gatehouse mcp client request ids", hashlib.sha256).digest()

    def _mac(self, user_id: str, session_id: str, request_id: str, seq: int) -> str:
        message = f"{user_id}\n{session_id}\n{request_id}\n{seq}".encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode()[:_MAC_CHARS]

    def seal(self, user_id: str, session_id: str, request_id: str, seq: int) -> str:
        return f"{PREFIX}.{request_id}.{seq}.{self._mac(user_id, session_id, request_id, seq)}"

    def open(self, user_id: str, session_id: str, ask_id: object) -> AskRoute | None:
        """Where the answer with this id goes, if the id was made for this user and session."""
        if not isinstance(ask_id, str) or len(ask_id) > 200:
            return None
        parts = ask_id.split(".")
        if len(parts) != 4 or parts[0] != PREFIX or not parts[2].isdigit() or len(parts[2]) > 9:
            return None
        _, request_id, seq_text, mac = parts
        seq = int(seq_text)
        if not hmac.compare_digest(mac, self._mac(user_id, session_id, request_id, seq)):
            return None
        return AskRoute(request_id, seq)

    def outgoing(self, message: bytes, user_id: str, session_id: str, request_id: str) -> bytes:
        """A message from the call's notice subject as the client gets it: notifications as
        they are; a request under the gateway's id (None if it cannot be read: dropped)."""
        try:
            if _decode_head(message).id is None:
                return message
            request = _decode_request(message)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return b""
        ask_id = self.seal(user_id, session_id, request_id, request.id)
        return (
            b'{"jsonrpc":"2.0","id":'
            + _encoder.encode(ask_id)
            + b',"method":'
            + _encoder.encode(request.method)
            + b',"params":'
            + request.params
            + b"}"
        )
