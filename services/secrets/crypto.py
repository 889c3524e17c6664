"""Envelope encryption, with no I/O: AES-256-GCM data keys wrapped by master keys.

Each secret version is sealed under a fresh random 256-bit data key; the data key is
wrapped (AES-256-GCM again) by a master key named by its key id (`kid`). Associated data
binds every ciphertext to where it belongs:

- a value to (org, owner, name, version), so a ciphertext copied onto another secret,
  user or version does not decrypt;
- a wrapped data key to (data key id, kid), so a wrapped key copied onto another row,
  or relabelled with another kid, does not unwrap.

Rewrapping unwraps a data key and wraps it again under the current master key; the sealed
value is never touched.
"""

import base64
import hashlib
import hmac
import os
import re
from collections.abc import Iterable

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
NONCE_BYTES = 12
KID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_AD_VALUE = "gatehouse.secret.v1"
_AD_WRAP = "gatehouse.data_key.v1"


class CryptoError(Exception):
    """Base class; messages never contain key material or plaintext."""


class MissingKey(CryptoError):
    def __init__(self, kid: str) -> None:
        super().__init__(f"master key `{kid}` is not in the keyring")
        self.kid = kid


class Corrupted(CryptoError):
    """Authentication failed: tampered bytes, wrong associated data, or the wrong key."""


class KeyringError(CryptoError):
    """The keyring text is malformed; the message names the entry, never its key."""


class MasterKey(msgspec.Struct, frozen=True):
    kid: str
    key: bytes

    def __repr__(self) -> str:  # a key must not end up in a log line or a traceback
        return f"MasterKey(kid={self.kid!r})"


class Keyring:
    """Master keys by kid; the first is current (new data keys are wrapped under it)."""

    def __init__(self, keys: Iterable[MasterKey]) -> None:
        self._keys = list(keys)
        if not self._keys:
            raise KeyringError("the keyring is empty")
        self._by_kid = {k.kid: k for k in self._keys}
        if len(self._by_kid) != len(self._keys):
            raise KeyringError("the keyring names a key id twice")

    @classmethod
    def parse(cls, text: str) -> "Keyring":
        """`kid:base64key` entries, newest first, separated by commas or new lines."""
        keys = []
        for position, entry in enumerate(re.split(r"[,\n]", text), start=1):
            entry = entry.strip()
            if not entry or entry.startswith("#"):
                continue
            kid, sep, encoded = entry.partition(":")
            kid = kid.strip()
            if not sep or not KID_PATTERN.match(kid):
                raise KeyringError(f"keyring entry {position} is not `kid:base64key`")
            try:
                key = base64.b64decode(encoded.strip(), validate=True)
            except ValueError:
                raise KeyringError(f"master key `{kid}` is not valid base64") from None
            if len(key) != KEY_BYTES:
                raise KeyringError(f"master key `{kid}` must decode to {KEY_BYTES} bytes")
            keys.append(MasterKey(kid, key))
        return cls(keys)

    def format(self) -> str:
        return "".join(f"{k.kid}:{base64.b64encode(k.key).decode()}\n" for k in self._keys)

    @property
    def current(self) -> MasterKey:
        return self._keys[0]

    @property
    def kids(self) -> list[str]:
        return [k.kid for k in self._keys]

    def get(self, kid: str) -> MasterKey:
        key = self._by_kid.get(kid)
        if key is None:
            raise MissingKey(kid)
        return key

    def __contains__(self, kid: object) -> bool:
        return kid in self._by_kid

    def with_new_key(self, kid: str) -> "Keyring":
        if not KID_PATTERN.match(kid):
            raise KeyringError(f"`{kid}` is not a valid key id")
        return Keyring([MasterKey(kid, AESGCM.generate_key(bit_length=256)), *self._keys])

    def without(self, kid: str) -> "Keyring":
        self.get(kid)
        return Keyring(k for k in self._keys if k.kid != kid)

    def __repr__(self) -> str:
        return f"Keyring(kids={self.kids!r})"


def new_master_key(kid: str) -> Keyring:
    return Keyring([MasterKey(kid, AESGCM.generate_key(bit_length=256))])


class Sealed(msgspec.Struct, frozen=True):
    nonce: bytes
    ciphertext: bytes  # includes the 16-byte GCM tag


class WrappedKey(msgspec.Struct, frozen=True):
    kid: str
    wrapped: bytes  # nonce || AES-GCM(data key)

    def __repr__(self) -> str:
        return f"WrappedKey(kid={self.kid!r})"


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def associated_data(org_id: str, owner: str, name: str, version: int) -> bytes:
    """Canonical bytes of where a value belongs (owner: a user id, or "org")."""
    return msgspec.json.encode([_AD_VALUE, org_id, owner, name, version])


def _wrap_ad(data_key_id: str, kid: str) -> bytes:
    return msgspec.json.encode([_AD_WRAP, data_key_id, kid])


def seal(plaintext: bytes, data_key: bytes, ad: bytes) -> Sealed:
    nonce = os.urandom(NONCE_BYTES)
    return Sealed(nonce, AESGCM(data_key).encrypt(nonce, plaintext, ad))


def open_sealed(sealed: Sealed, data_key: bytes, ad: bytes) -> bytes:
    try:
        return AESGCM(data_key).decrypt(sealed.nonce, sealed.ciphertext, ad)
    except (InvalidTag, ValueError):
        raise Corrupted("the ciphertext does not authenticate") from None


def wrap(data_key: bytes, data_key_id: str, keyring: Keyring) -> WrappedKey:
    master = keyring.current
    nonce = os.urandom(NONCE_BYTES)
    body = AESGCM(master.key).encrypt(nonce, data_key, _wrap_ad(data_key_id, master.kid))
    return WrappedKey(master.kid, nonce + body)


def unwrap(wrapped: WrappedKey, data_key_id: str, keyring: Keyring) -> bytes:
    master = keyring.get(wrapped.kid)
    nonce, body = wrapped.wrapped[:NONCE_BYTES], wrapped.wrapped[NONCE_BYTES:]
    try:
        key = AESGCM(master.key).decrypt(nonce, body, _wrap_ad(data_key_id, wrapped.kid))
    except (InvalidTag, ValueError):
        raise Corrupted("the wrapped data key does not authenticate") from None
    if len(key) != KEY_BYTES:
        raise Corrupted("the wrapped data key has the wrong length")
    return key


def rewrap(wrapped: WrappedKey, data_key_id: str, keyring: Keyring) -> WrappedKey:
    """The same data key under the current master key (the sealed value is not involved)."""
    return wrap(unwrap(wrapped, data_key_id, keyring), data_key_id, keyring)


def fingerprint(key: bytes, value: bytes) -> str:
    """Keyed (HMAC-SHA256, 128 bits shown): without the key, a fingerprint permits no guessing."""
    return "hmac-sha256:" + hmac.new(key, value, hashlib.sha256).hexdigest()[:32]


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)
