"""The secrets service's use cases: load, decide, save (synchronous; run them in a worker thread).

Order of writes, so that a crash never leaves a value without its key or a revoked secret
readable: a new version's data key is written to the keystore before its event is saved
(an orphan row is harmless; a ciphertext without a key is not), and a revocation destroys
the keys before it records the fact (a secret never stays readable after DELETE answered).

Reveals read the keystore on every call: it is the one place where a revocation or a
replacement on any instance shows at once. Ciphertexts come from a per-process cache of
the aggregates (a version's ciphertext never changes).
"""

import os
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import msgspec
from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import IntegrityError

from contracts.commands.secrets import Scope
from services.kit.eventstore import retrying
from services.secrets.adapters.keystore import KeyRow
from services.secrets.crypto import (
    Corrupted,
    Keyring,
    MissingKey,
    Sealed,
    WrappedKey,
    associated_data,
    b64,
    fingerprint,
    new_data_key,
    open_sealed,
    rewrap,
    seal,
    unb64,
    unwrap,
    wrap,
)
from services.secrets.domain import (
    ORG_OWNER,
    KeyUnavailable,
    Meta,
    Refusal,
    RevealRecord,
    RewrapRun,
    Secret,
    Shelf,
    Unreadable,
    check_name,
    check_reveal,
    check_value,
    label,
    not_found,
    owner_for,
    revoked,
    secret_id,
)

T = TypeVar("T")
NEGATIVE_TTL_S = 5.0
MAX_CACHED = 20_000  # sealings (a ciphertext each) and absences kept per process
NIL = "00000000-0000-0000-0000-000000000000"
FINGERPRINT_KEY_ID = str(uuid.uuid5(uuid.UUID(int=0), "gatehouse.secrets.fingerprint-key"))


def now() -> datetime:
    return datetime.now(UTC)


class NeedsLoad(Exception):
    """A reveal needs an aggregate that is not cached (see `Secrets.reveal_from`)."""


class Keystore(Protocol):
    """Wrapped data keys, destroyable and rewrappable (adapters/keystore.py)."""

    def add(self, row: KeyRow) -> bool: ...
    def get(self, data_key_id: str) -> WrappedKey | None: ...
    def live(self, secret_ids: list[str]) -> list[KeyRow]: ...
    def destroy(self, data_key_id: str) -> int: ...
    def destroy_secret(self, secret_id: str) -> int: ...
    def kids_of(self, data_key_ids: list[str]) -> dict[str, str]: ...
    def usage(self) -> dict[str, int]: ...
    def sample(self, kid: str, limit: int) -> list[KeyRow]: ...
    def not_under(self, kid: str, after: str, limit: int) -> list[KeyRow]: ...
    def replace(self, updates: list[tuple[str, str, WrappedKey]]) -> int: ...


class Usage(Protocol):
    """When each secret was last revealed (adapters/usage.py)."""

    def touch(self, used: dict[str, datetime]) -> None: ...
    def last_used(self, secret_ids: list[str]) -> dict[str, datetime]: ...
    def forget(self, secret_id: str, at: datetime) -> None: ...


class Sealing(msgspec.Struct, frozen=True):
    """What a reveal needs from a secret's aggregate (cached: a version never changes)."""

    secret_id: str
    org_id: str
    owner: str
    name: str
    version: int
    nonce: bytes
    ciphertext: bytes
    data_key_id: str
    revoked_at: datetime | None

    @property
    def scope(self) -> Scope:
        return "org" if self.owner == ORG_OWNER else "user"


class RevealRequest(msgspec.Struct, frozen=True):
    service: str
    purpose: str
    org_id: str
    user_id: str
    name: str
    lookup: str  # "user" | "org" | "any"


class Reveal(msgspec.Struct, frozen=True):
    """A reveal that happened (recorded by the reveal log, after the reply)."""

    sealing: Sealing
    request: RevealRequest
    at: datetime
    meta: Meta


class Denial(msgspec.Struct, frozen=True):
    request: RevealRequest
    reason: str
    at: datetime
    meta: Meta


class SecretInfo(msgspec.Struct, frozen=True):
    secret: Secret
    kid: str  # the master key its current data key is wrapped under now
    last_used_at: datetime | None = None


class RewrapResult(msgspec.Struct, frozen=True):
    kid: str
    rewrapped: int
    already_current: int
    moved: dict[str, int]
    unreadable: dict[str, int]
    seconds: float


class Secrets(Application[uuid.UUID]):
    name = "secrets"
    snapshotting_intervals = {Secret: 50}

    def __init__(
        self,
        keyring: Keyring,
        keystore: Keystore,
        usage: Usage,
        env: dict[str, str] | None = None,
        reload_keyring: Callable[[], Keyring] | None = None,
    ) -> None:
        super().__init__(env=env)
        self.keyring = keyring
        self.keystore = keystore
        self.usage = usage
        self._reload_keyring = reload_keyring
        self._reloaded_at = 0.0
        self.on_saved: Callable[[], None] = lambda: None
        self._sealings: dict[str, Sealing] = {}
        self._absent: dict[str, float] = {}  # secret id -> monotonic time it was seen absent
        self._lock = threading.Lock()
        self._fingerprint_key = self._service_key(FINGERPRINT_KEY_ID)

    def _notify(self, recordings: Any) -> None:  # called after every save
        super()._notify(recordings)
        self.on_saved()

    # -- writes -----------------------------------------------------------------------------
    def put(self, org_id: str, user_id: str, scope: str, name: str, value: str, meta: Meta) -> SecretInfo:
        owner = owner_for(scope, user_id)
        raw = check_value(check_name(name), value)
        mark = fingerprint(self._fingerprint_key, raw)

        def attempt() -> SecretInfo:
            secret = self._load(secret_id(org_id, owner, name))
            shelf = self._shelf(org_id, owner)
            if secret is None:
                secret = Secret(org_id=org_id, owner=owner, name=name, meta=meta)
            version = secret.value_version + 1
            data_key, data_key_id = new_data_key(), str(uuid.uuid4())
            sealed = seal(raw, data_key, associated_data(org_id, owner, name, version))
            wrapped = wrap(data_key, data_key_id, self.keyring)
            self.keystore.add(KeyRow(data_key_id, str(secret.id), version, wrapped))
            superseded = secret.store(
                version,
                b64(sealed.nonce),
                b64(sealed.ciphertext),
                data_key_id,
                wrapped.kid,
                mark,
                now(),
                meta,
            )
            try:
                if shelf.add(name):
                    self.save(secret, shelf)
                else:
                    self.save(secret)
            except IntegrityError:
                self.keystore.destroy(data_key_id)
                raise
            if superseded:
                self.keystore.destroy(superseded)  # a replaced value is shredded too
            self._remember(secret)
            return SecretInfo(secret, wrapped.kid, self.usage.last_used([str(secret.id)]).get(str(secret.id)))

        return retrying(attempt)

    def revoke(self, org_id: str, user_id: str, scope: str, name: str, meta: Meta) -> None:
        """Destroys the data keys first, then records the revocation; repeating it is harmless."""
        owner = owner_for(scope, user_id)
        check_name(name)
        sid = secret_id(org_id, owner, name)

        def attempt() -> None:
            secret = self._load(sid)
            if secret is None:
                raise not_found(name, scope)
            secret.check_stored()
            self.keystore.destroy_secret(str(sid))
            if secret.revoke(now(), meta):
                self.save(secret)
            self.usage.forget(str(sid), now())
            self._remember(secret)

        retrying(attempt)

    # -- reads ------------------------------------------------------------------------------
    def info(self, org_id: str, user_id: str, scope: str, name: str) -> SecretInfo:
        owner = owner_for(scope, user_id)
        check_name(name)
        secret = self._load(secret_id(org_id, owner, name))
        if secret is None:
            raise not_found(name, scope)
        secret.check_usable()
        kid = self.keystore.kids_of([secret.data_key_id]).get(secret.data_key_id, secret.kid)
        return SecretInfo(secret, kid, self.usage.last_used([str(secret.id)]).get(str(secret.id)))

    def listing(self, org_id: str, user_id: str, lookup: str) -> list[SecretInfo]:
        owners = {"user": [user_id], "org": [ORG_OWNER], "any": [user_id, ORG_OWNER]}[lookup]
        found: list[Secret] = []
        for owner in owners:
            shelf = self._shelf(org_id, owner)
            for name in sorted(shelf.names):
                secret = self._load(secret_id(org_id, owner, name))
                if secret is not None and secret.active:
                    found.append(secret)
        kids = self.keystore.kids_of([s.data_key_id for s in found])
        used = self.usage.last_used([str(s.id) for s in found])
        return [SecretInfo(s, kids.get(s.data_key_id, s.kid), used.get(str(s.id))) for s in found]

    # -- reveal -----------------------------------------------------------------------------
    def reveal(self, ask: RevealRequest) -> tuple[Sealing, bytes]:
        """The value for one named use; a SecretsError says why not (never with a value)."""
        return self.reveal_from(ask, self.keystore.live(self.candidates(ask)), load=True)

    def candidates(self, ask: RevealRequest) -> list[str]:
        """The secret ids a reveal may resolve to, in order (own, then org's); checks the ask."""
        check_reveal(ask.service, ask.purpose)
        name = check_name(ask.name)
        owners = {"user": [ask.user_id], "org": [ORG_OWNER], "any": [ask.user_id, ORG_OWNER]}.get(ask.lookup)
        if owners is None:
            raise not_found(name, "user")
        return [str(secret_id(ask.org_id, owner, name)) for owner in owners]

    def reveal_from(self, ask: RevealRequest, live: list[KeyRow], load: bool) -> tuple[Sealing, bytes]:
        """The reveal, given the live data keys of the candidates (read fresh by the caller).

        With `load=False` nothing blocks (the caller is the event loop): a secret missing
        from the cache raises NeedsLoad, and the caller tries again in a worker thread.
        """
        for sid in self.candidates(ask):
            rows = {r.id: r for r in live if r.secret_id == sid}
            sealing = self._sealing(sid, want=set(rows), load=load)
            if sealing is None:
                continue
            if sealing.revoked_at is not None:
                raise revoked(sealing.name, sealing.scope, sealing.revoked_at)
            row = rows.get(sealing.data_key_id)
            if row is None:
                raise Unreadable(
                    f"{label(ask.name, sealing.scope)} cannot be read: its data key is missing; set it again"
                )
            return sealing, self._open(sealing, row.wrapped)
        raise not_found(ask.name, "org" if ask.lookup == "org" else "user")

    def _sealing(self, sid: str, want: set[str], load: bool = True) -> Sealing | None:
        """The cached sealing when it matches a live data key; else the aggregate, fresh."""
        cached = self._sealings.get(sid)
        if cached is not None and (cached.data_key_id in want or (not want and cached.revoked_at)):
            return cached
        if not want:
            seen_absent = self._absent.get(sid)
            if seen_absent is not None and time.monotonic() - seen_absent < NEGATIVE_TTL_S:
                return None
        if not load:
            raise NeedsLoad(sid)
        secret = self._load(uuid.UUID(sid))
        if secret is None or secret.value_version == 0:
            with self._lock:
                _bounded(self._absent)[sid] = time.monotonic()
            return None
        return self._remember(secret)

    def _open(self, sealing: Sealing, wrapped: WrappedKey) -> bytes:
        where = label(sealing.name, sealing.scope)
        try:
            data_key = unwrap(wrapped, sealing.data_key_id, self._keyring_with(wrapped.kid))
            ad = associated_data(sealing.org_id, sealing.owner, sealing.name, sealing.version)
            return open_sealed(Sealed(sealing.nonce, sealing.ciphertext), data_key, ad)
        except MissingKey as missing:
            raise KeyUnavailable(
                f"{where} is wrapped under master key `{missing.kid}`, which this service does not "
                "have (retired or missing); restore that key to GATEHOUSE_MASTER_KEYS",
                missing.kid,
            ) from None
        except Corrupted:
            raise Unreadable(
                f"{where} is corrupted: its stored ciphertext or data key does not authenticate; set it again"
            ) from None

    def record(self, reveals: list[Reveal], denials: list[Denial]) -> None:
        """Records reveals and refusals as facts, in one transaction; then moves last_used_at."""
        facts: list[Aggregate] = [
            RevealRecord(
                secret_id=r.sealing.secret_id,
                name=r.sealing.name,
                owner=r.sealing.owner,
                service=r.request.service,
                purpose=r.request.purpose,
                user_id=r.request.user_id,
                value_version=r.sealing.version,
                revealed_at=r.at,
                meta={**r.meta, "org_id": r.sealing.org_id},
            )
            for r in reveals
        ]
        facts += [
            Refusal(
                name=d.request.name[:200],
                scope=d.request.lookup,
                user_id=d.request.user_id,
                service=d.request.service,
                purpose=d.request.purpose[:200],
                reason=d.reason,
                denied_at=d.at,
                meta={**d.meta, "org_id": d.request.org_id},
            )
            for d in denials
        ]
        self.save(*facts)
        used: dict[str, datetime] = {}
        for r in reveals:
            used[r.sealing.secret_id] = max(r.at, used.get(r.sealing.secret_id, r.at))
        self.usage.touch(used)

    # -- master keys ------------------------------------------------------------------------
    def rewrap_all(self, meta: Meta, batch: int = 500) -> RewrapResult:
        """Every data key under the current master key; values are never decrypted."""
        started = time.monotonic()
        keyring = self.keyring
        current = keyring.current.kid
        already = self.keystore.usage().get(current, 0)
        moved: dict[str, int] = {}
        unreadable: dict[str, int] = {}
        after = NIL
        while True:
            rows = self.keystore.not_under(current, after, batch)
            if not rows:
                break
            updates = []
            for row in rows:
                try:
                    updates.append((row.id, row.wrapped.kid, rewrap(row.wrapped, row.id, keyring)))
                except (MissingKey, Corrupted):
                    unreadable[row.wrapped.kid] = unreadable.get(row.wrapped.kid, 0) + 1
            self.keystore.replace(updates)
            for _, old_kid, _ in updates:
                moved[old_kid] = moved.get(old_kid, 0) + 1
            after = rows[-1].id
        count = sum(moved.values())
        if count:
            self.save(RewrapRun(kid=current, count=count, from_kids=moved, at=now(), meta=meta))
        return RewrapResult(current, count, already, moved, unreadable, time.monotonic() - started)

    def key_usage(self, sample: int = 20) -> list[tuple[str, int, bool, list[str]]]:
        """(kid, data keys under it, known to this service, a sample of what it wraps)."""
        out = []
        for kid, count in sorted(self.keystore.usage().items()):
            names = []
            if kid != self.keyring.current.kid:
                for row in self.keystore.sample(kid, sample):
                    names.append(self._describe(row))
            out.append((kid, count, kid in self.keyring, names))
        return out

    def reload_keys(self) -> Keyring:
        if self._reload_keyring is not None:
            with self._lock:
                self.keyring = self._reload_keyring()
                self._reloaded_at = time.monotonic()
        return self.keyring

    def _keyring_with(self, kid: str) -> Keyring:
        """The keyring; re-read (at most every 5 s) when it lacks `kid` (another instance rotated)."""
        keyring = self.keyring
        if kid not in keyring and self._reload_keyring is not None:
            if time.monotonic() - self._reloaded_at > 5.0:
                try:
                    keyring = self.reload_keys()
                except Exception:  # a broken file must not turn a reveal into a crash
                    self._reloaded_at = time.monotonic()
        return keyring

    def _describe(self, row: KeyRow) -> str:
        if row.id == FINGERPRINT_KEY_ID:
            return "the fingerprint key"
        secret = self._load(uuid.UUID(row.secret_id))
        if secret is None:
            return f"an orphan data key {row.id}"
        where = f"org {secret.org_id}" if secret.owner == ORG_OWNER else f"user {secret.owner}"
        return f"{secret.name} ({where}, version {row.version})"

    # -- internals --------------------------------------------------------------------------
    def _service_key(self, key_id: str) -> bytes:
        """A key of the service itself, kept wrapped in the keystore like a data key."""
        wrapped = self.keystore.get(key_id)
        if wrapped is None:
            self.keystore.add(KeyRow(key_id, NIL, 0, wrap(os.urandom(32), key_id, self.keyring)))
            wrapped = self.keystore.get(key_id)
            assert wrapped is not None
        return unwrap(wrapped, key_id, self.keyring)

    def _load(self, sid: uuid.UUID) -> Secret | None:
        try:
            secret: Aggregate = self.repository.get(sid)
        except AggregateNotFoundError:
            return None
        return secret if isinstance(secret, Secret) else None

    def _shelf(self, org_id: str, owner: str) -> Shelf:
        try:
            shelf: Shelf = self.repository.get(Shelf.create_id(org_id, owner))
            return shelf
        except AggregateNotFoundError:
            return Shelf(org_id=org_id, owner=owner)

    def _remember(self, secret: Secret) -> Sealing:
        sealing = Sealing(
            secret_id=str(secret.id),
            org_id=secret.org_id,
            owner=secret.owner,
            name=secret.name,
            version=secret.value_version,
            nonce=unb64(secret.nonce) if secret.nonce else b"",
            ciphertext=unb64(secret.ciphertext) if secret.ciphertext else b"",
            data_key_id=secret.data_key_id,
            revoked_at=secret.revoked_at,
        )
        with self._lock:
            _bounded(self._sealings)[sealing.secret_id] = sealing
            self._absent.pop(sealing.secret_id, None)
        return sealing


def _bounded(cache: dict[str, T]) -> dict[str, T]:
    """The cache, its oldest entry dropped when full (callers hold the lock)."""
    if len(cache) >= MAX_CACHED:
        cache.pop(next(iter(cache)))
    return cache
