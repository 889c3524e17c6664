"""Ed25519 signatures on checkpoints, with `cryptography`.

The service signs with one private key and accepts signatures by it and by the public keys
it is told to trust (earlier keys, after a rotation). A key is named by `key_id`, the first
16 hex digits of the SHA-256 of its raw public key.
"""

import base64
import binascii
import hashlib
from collections.abc import Iterable

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from services.audit.domain import Checkpoint, statement
from services.kit.redaction import register_secret


def key_id_of(public: Ed25519PublicKey) -> str:
    return hashlib.sha256(public.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()[:16]


class CheckpointSigner:
    def __init__(self, seed: bytes | None, trusted: Iterable[bytes] = ()) -> None:
        self._private = Ed25519PrivateKey.from_private_bytes(seed) if seed else None
        if seed:
            register_secret(base64.b64encode(seed).decode())
        publics = [Ed25519PublicKey.from_public_bytes(raw) for raw in trusted]
        if self._private is not None:
            publics.insert(0, self._private.public_key())
        self._trusted = {key_id_of(public): public for public in publics}

    @property
    def can_sign(self) -> bool:
        return self._private is not None

    @property
    def key_id(self) -> str | None:
        return key_id_of(self._private.public_key()) if self._private else None

    @property
    def public_key(self) -> str | None:
        """Base64 of the raw public key, to hand to whoever checks checkpoints elsewhere."""
        if self._private is None:
            return None
        raw = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return base64.b64encode(raw).decode()

    def sign(self, checkpoint: Checkpoint) -> Checkpoint:
        if self._private is None or self.key_id is None:
            raise RuntimeError("no audit signing key is configured")
        signature = self._private.sign(statement(checkpoint))
        return msgspec.structs.replace(
            checkpoint, key_id=self.key_id, signature=base64.b64encode(signature).decode()
        )

    def problem_with(self, checkpoint: Checkpoint) -> str | None:
        """What is wrong with a checkpoint's signature, or None when it is good."""
        public = self._trusted.get(checkpoint.key_id)
        if public is None:
            return (
                f"is signed by key {checkpoint.key_id or '(none)'}, which this service does not trust "
                "(GATEHOUSE_AUDIT_SIGNING_KEY, GATEHOUSE_AUDIT_TRUSTED_KEYS)"
            )
        try:
            public.verify(base64.b64decode(checkpoint.signature, validate=True), statement(checkpoint))
        except (InvalidSignature, ValueError, binascii.Error):
            return "has a signature that does not match its content"
        return None
