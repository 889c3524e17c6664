"""Envelope encryption keeps the promises of a KMS (pure code: no database, no bus)."""

import base64
import uuid

import pytest

from services.secrets.crypto import (
    Corrupted,
    Keyring,
    KeyringError,
    MasterKey,
    MissingKey,
    Sealed,
    WrappedKey,
    associated_data,
    fingerprint,
    new_data_key,
    new_master_key,
    open_sealed,
    rewrap,
    seal,
    unwrap,
    wrap,
)

pytestmark = pytest.mark.unit

VALUE = b"ssh-ed25519 AAAAC3Nza...\n-----multi-line-----\n"


class Stored:
    """One secret version as the service keeps it: sealed value in an event, wrapped key in a row."""

    def __init__(self, keyring: Keyring, value: bytes, where: tuple[str, str, str, int]) -> None:
        self.where = where
        self.key_id = str(uuid.uuid4())
        data_key = new_data_key()
        self.sealed = seal(value, data_key, associated_data(*where))
        self.wrapped = wrap(data_key, self.key_id, keyring)

    def read(self, keyring: Keyring) -> bytes:
        data_key = unwrap(self.wrapped, self.key_id, keyring)
        return open_sealed(self.sealed, data_key, associated_data(*self.where))


def test_encrypt_rotate_rewrap_retire_and_everything_still_decrypts() -> None:
    ring = new_master_key("k1")
    old = [Stored(ring, VALUE + bytes([i]), ("org-1", "user-1", f"s{i}", 1)) for i in range(5)]
    assert {s.wrapped.kid for s in old} == {"k1"}

    ring = ring.with_new_key("k2")  # rotate: k2 is current, k1 still held
    assert ring.current.kid == "k2" and ring.kids == ["k2", "k1"]
    new = Stored(ring, VALUE, ("org-1", "user-1", "fresh", 1))
    assert new.wrapped.kid == "k2"
    assert [s.read(ring) for s in old] == [VALUE + bytes([i]) for i in range(5)]  # old versions decrypt

    sealed_before = [s.sealed for s in old]
    for s in old:  # rewrap: only the data keys change
        s.wrapped = rewrap(s.wrapped, s.key_id, ring)
    assert {s.wrapped.kid for s in old} == {"k2"}
    assert [s.sealed for s in old] == sealed_before

    ring = ring.without("k1")  # retire
    assert ring.kids == ["k2"]
    assert [s.read(ring) for s in old] == [VALUE + bytes([i]) for i in range(5)]
    assert new.read(ring) == VALUE


def test_wrong_associated_data_fails() -> None:
    ring = new_master_key("k1")
    stored = Stored(ring, VALUE, ("org-1", "user-1", "github_token", 2))
    data_key = unwrap(stored.wrapped, stored.key_id, ring)
    for where in [
        ("org-2", "user-1", "github_token", 2),  # another org
        ("org-1", "user-2", "github_token", 2),  # another user
        ("org-1", "org", "github_token", 2),  # the org's secret of that name
        ("org-1", "user-1", "jira_token", 2),  # another name
        ("org-1", "user-1", "github_token", 1),  # another version
    ]:
        with pytest.raises(Corrupted):
            open_sealed(stored.sealed, data_key, associated_data(*where))


def test_a_wrapped_key_moved_to_another_row_or_relabelled_does_not_unwrap() -> None:
    ring = new_master_key("k1").with_new_key("k2")
    stored = Stored(ring, VALUE, ("o", "u", "n", 1))
    with pytest.raises(Corrupted):
        unwrap(stored.wrapped, str(uuid.uuid4()), ring)  # copied onto another data key row
    relabelled = WrappedKey("k1", stored.wrapped.wrapped)
    with pytest.raises(Corrupted):
        unwrap(relabelled, stored.key_id, ring)


@pytest.mark.parametrize("part", ["nonce", "ciphertext", "tag", "wrapped"])
def test_tampering_fails(part: str) -> None:
    ring = new_master_key("k1")
    stored = Stored(ring, VALUE, ("o", "u", "n", 1))

    def flip(raw: bytes, at: int) -> bytes:
        return raw[:at] + bytes([raw[at] ^ 1]) + raw[at + 1 :]

    if part == "nonce":
        stored.sealed = Sealed(flip(stored.sealed.nonce, 0), stored.sealed.ciphertext)
    elif part == "ciphertext":
        stored.sealed = Sealed(stored.sealed.nonce, flip(stored.sealed.ciphertext, 0))
    elif part == "tag":
        stored.sealed = Sealed(stored.sealed.nonce, flip(stored.sealed.ciphertext, -1))
    else:
        stored.wrapped = WrappedKey("k1", flip(stored.wrapped.wrapped, 20))
    with pytest.raises(Corrupted):
        stored.read(ring)


def test_truncated_bytes_are_corrupted_not_a_crash() -> None:
    ring = new_master_key("k1")
    stored = Stored(ring, VALUE, ("o", "u", "n", 1))
    with pytest.raises(Corrupted):
        unwrap(WrappedKey("k1", stored.wrapped.wrapped[:5]), stored.key_id, ring)
    with pytest.raises(Corrupted):
        open_sealed(Sealed(b"", b""), new_data_key(), b"")


def test_shredding_the_data_key_leaves_the_ciphertext_unreadable() -> None:
    ring = new_master_key("k1")
    stored = Stored(ring, VALUE, ("o", "u", "n", 1))
    del stored.wrapped  # the keystore row is deleted: nothing else holds the data key
    for _ in range(3):  # no other key opens it: not a fresh one, not a master key
        with pytest.raises(Corrupted):
            open_sealed(stored.sealed, new_data_key(), associated_data(*stored.where))
    with pytest.raises(Corrupted):
        open_sealed(stored.sealed, ring.current.key, associated_data(*stored.where))
    assert VALUE not in stored.sealed.ciphertext


def test_a_missing_master_key_is_named() -> None:
    ring = new_master_key("k1")
    stored = Stored(ring, VALUE, ("o", "u", "n", 1))
    other = new_master_key("k9")
    with pytest.raises(MissingKey) as err:
        stored.read(other)
    assert err.value.kid == "k1" and "`k1`" in str(err.value)


def test_keyring_parses_newest_first_and_reports_bad_entries_without_key_material() -> None:
    k1, k2 = base64.b64encode(b"1" * 32).decode(), base64.b64encode(b"2" * 32).decode()
    ring = Keyring.parse(f"new:{k2}, old:{k1}")
    assert ring.kids == ["new", "old"] and ring.current.kid == "new"
    assert Keyring.parse(ring.format()).kids == ["new", "old"]
    assert Keyring.parse(f"# comment\nnew:{k2}\n\nold:{k1}\n").kids == ["new", "old"]
    short = base64.b64encode(b"x" * 16).decode()
    cases = {
        "": "empty",
        f"k1{k1}": "entry 1",
        f"k1:{short}": "32 bytes",
        "k1:not*base64": "base64",
        f"k1:{k1},k1:{k2}": "twice",
        f"bad id:{k1}": "entry 1",
    }
    for text, expected in cases.items():
        with pytest.raises(KeyringError) as err:
            Keyring.parse(text)
        assert expected in str(err.value)
        assert k1 not in str(err.value) and k2 not in str(err.value)


def test_key_material_stays_out_of_reprs() -> None:
    ring = new_master_key("k1")
    key = ring.current.key
    texts = [
        repr(ring),
        repr(ring.current),
        repr(MasterKey("k1", key)),
        repr(wrap(new_data_key(), "x", ring)),
    ]
    for text in texts:
        assert base64.b64encode(key).decode() not in text and str(key) not in text


def test_fingerprints_are_keyed_and_stable() -> None:
    key = b"f" * 32
    assert fingerprint(key, b"hunter2") == fingerprint(key, b"hunter2")
    assert fingerprint(key, b"hunter2") != fingerprint(key, b"hunter3")
    assert fingerprint(key, b"hunter2") != fingerprint(b"g" * 32, b"hunter2")
    assert fingerprint(key, b"hunter2").startswith("hmac-sha256:")
    assert len(fingerprint(key, b"x").split(":")[1]) == 32


def test_every_version_gets_its_own_data_key_and_nonce() -> None:
    ring = new_master_key("k1")
    a = Stored(ring, VALUE, ("o", "u", "n", 1))
    b = Stored(ring, VALUE, ("o", "u", "n", 1))
    assert a.sealed.nonce != b.sealed.nonce and a.sealed.ciphertext != b.sealed.ciphertext
    assert unwrap(a.wrapped, a.key_id, ring) != unwrap(b.wrapped, b.key_id, ring)
