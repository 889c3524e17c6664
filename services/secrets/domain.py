"""Secrets: the rules, with no I/O.

A secret is addressed by (org, owner, name); the owner is a user id, or "org" for an org
secret. Its aggregate id derives from that triple, so a user can only ever reach their own
secrets (another user's name is simply another aggregate: "not found"). Each stored value
is a new version; its events record the ciphertext and nonce, the id of the data key that
seals it, the master key id it was first wrapped under, and a keyed fingerprint. The data
key itself is never in an event: it lives in the keystore, where revocation destroys it.

Messages are for humans and never contain a value.
"""

import re
import uuid
from datetime import datetime
from typing import Any

from eventsourcing.domain import Aggregate, event

from contracts.commands.secrets import MAX_VALUE_BYTES, NAME_PATTERN, REVEALERS, Scope

ORG_OWNER = "org"
API_KEY_NAMES = frozenset({"cursor_api_key"})  # well-known names whose value is an API key
MIN_API_KEY_LENGTH = 20
NAMESPACE = uuid.UUID("5d1b7a0e-3f4c-4b6a-9e2d-7c8f1a2b3c4d")
NAME_RE = re.compile(NAME_PATTERN)
PURPOSE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")

Meta = dict[str, Any]


class SecretsError(Exception):
    """A rule was broken; the message is for a human and never contains a value."""


class Invalid(SecretsError):
    pass


class NotFound(SecretsError):
    pass


class Revoked(SecretsError):
    pass


class Refused(SecretsError):
    """The caller may not reveal this (wrong service or purpose)."""


class Unreadable(SecretsError):
    """Stored bytes do not decrypt (tampered, or bound to another row): never a crash."""


class KeyUnavailable(SecretsError):
    """The master key a data key is wrapped under is not in this service's keyring."""

    def __init__(self, message: str, kid: str) -> None:
        super().__init__(message)
        self.kid = kid


# -- rules ------------------------------------------------------------------------------
def scope_of(owner: str) -> str:
    return "org" if owner == ORG_OWNER else "user"


def owner_for(scope: str, user_id: str) -> str:
    if scope == "org":
        return ORG_OWNER
    if scope == "user":
        return user_id
    raise Invalid(f"unknown scope {scope!r}; scopes are user and org")


def label(name: str, scope: str) -> str:
    return f"org secret `{name}`" if scope == "org" else f"secret `{name}`"


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        shown = name if len(name) <= 80 else name[:80] + "…"
        raise Invalid(
            f"{shown!r} is not a valid secret name: use 1-64 characters of a-z, 0-9, '_', '.' "
            "or '-', starting with a letter or a digit"
        )
    return name


def check_value(name: str, value: str) -> bytes:
    """The value as bytes; the message of a refusal describes it without quoting it."""
    raw = value.encode("utf-8", errors="surrogatepass")
    if not raw:
        raise Invalid(f"the value of secret `{name}` is empty; values are 1 byte to 16 KiB")
    if len(raw) > MAX_VALUE_BYTES:
        raise Invalid(
            f"the value of secret `{name}` is {len(raw)} bytes; values are at most "
            f"{MAX_VALUE_BYTES} bytes (16 KiB)"
        )
    if name in API_KEY_NAMES and (len(value) < MIN_API_KEY_LENGTH or any(c.isspace() for c in value)):
        raise Invalid(
            f"`{name}` must be an API key: at least {MIN_API_KEY_LENGTH} characters with no spaces "
            "or line breaks (check that you pasted the whole key and nothing around it)"
        )
    return raw


def check_reveal(service: str, purpose: str) -> str:
    """The purpose, when `service` may reveal for it; Refused otherwise."""
    kind = REVEALERS.get(service)
    if kind is None:
        raise Refused(f"the {service} service may not reveal secrets")
    prefix, _, ident = purpose.partition(":")
    if prefix != kind or not PURPOSE_ID_RE.fullmatch(ident):
        raise Refused(f"a reveal by {service} must name its purpose as `{kind}:<id>`")
    return purpose


def not_found(name: str, scope: str) -> NotFound:
    """The same sentence whether the name never existed or belongs to someone else."""
    where = "your org has no" if scope == "org" else "you have no"
    return NotFound(f"{where} secret named `{name}`")


def revoked(name: str, scope: str, revoked_at: datetime) -> Revoked:
    return Revoked(
        f"{label(name, scope)} was revoked on {revoked_at:%Y-%m-%d %H:%M} UTC; set it again in Settings"
    )


# -- aggregates -------------------------------------------------------------------------
class Secret(Aggregate):
    """One named secret of a user or an org, through its versions and its revocation."""

    @staticmethod
    def create_id(org_id: str, owner: str, name: str, meta: Meta) -> uuid.UUID:
        return secret_id(org_id, owner, name)

    @event("Created")
    def __init__(self, org_id: str, owner: str, name: str, meta: Meta) -> None:
        self.org_id = org_id
        self.owner = owner
        self.name = name
        self.value_version = 0  # 0 until a value is stored (`version` is the aggregate's own)
        self.nonce = ""
        self.ciphertext = ""
        self.data_key_id = ""
        self.kid = ""
        self.fingerprint = ""
        self.stored_at: datetime | None = None
        self.first_stored_at: datetime | None = None
        self.revoked_at: datetime | None = None

    @property
    def scope(self) -> Scope:
        return "org" if self.owner == ORG_OWNER else "user"

    @property
    def active(self) -> bool:
        return self.value_version > 0 and self.revoked_at is None

    def check_usable(self) -> None:
        if self.value_version == 0:
            raise not_found(self.name, self.scope)
        if self.revoked_at is not None:
            raise revoked(self.name, self.scope, self.revoked_at)

    def store(
        self,
        version: int,
        nonce: str,
        ciphertext: str,
        data_key_id: str,
        kid: str,
        fingerprint: str,
        now: datetime,
        meta: Meta,
    ) -> str | None:
        """Records a new version (sealed for `version`); returns the data key it supersedes."""
        if version != self.value_version + 1:
            raise Invalid(f"secret `{self.name}` changed concurrently; try again")
        superseded = self.data_key_id or None
        self._stored(
            name=self.name,
            owner=self.owner,
            value_version=version,
            nonce=nonce,
            ciphertext=ciphertext,
            data_key_id=data_key_id,
            kid=kid,
            fingerprint=fingerprint,
            stored_at=now,
            meta=self._scoped(meta),
        )
        return superseded

    @event("Stored")
    def _stored(
        self,
        name: str,
        owner: str,
        value_version: int,
        nonce: str,
        ciphertext: str,
        data_key_id: str,
        kid: str,
        fingerprint: str,
        stored_at: datetime,
        meta: Meta,
    ) -> None:
        self.value_version = value_version
        self.nonce, self.ciphertext = nonce, ciphertext
        self.data_key_id, self.kid, self.fingerprint = data_key_id, kid, fingerprint
        self.stored_at = stored_at
        if self.first_stored_at is None or self.revoked_at is not None:
            self.first_stored_at = stored_at
        self.revoked_at = None

    def revoke(self, now: datetime, meta: Meta) -> bool:
        """False when already revoked: revoking twice is not an error."""
        self.check_stored()
        if self.revoked_at is not None:
            return False
        self._revoked(
            name=self.name,
            owner=self.owner,
            value_version=self.value_version,
            revoked_at=now,
            meta=self._scoped(meta),
        )
        return True

    @event("Revoked")
    def _revoked(self, name: str, owner: str, value_version: int, revoked_at: datetime, meta: Meta) -> None:
        self.revoked_at = revoked_at

    def check_stored(self) -> None:
        if self.value_version == 0:
            raise not_found(self.name, self.scope)

    def _scoped(self, meta: Meta) -> Meta:
        return {**meta, "org_id": self.org_id}


def secret_id(org_id: str, owner: str, name: str) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, f"secret:{org_id}:{owner}:{name}")


class Shelf(Aggregate):
    """The names of one owner's secrets, so they can be listed."""

    @staticmethod
    def create_id(org_id: str, owner: str) -> uuid.UUID:
        return uuid.uuid5(NAMESPACE, f"shelf:{org_id}:{owner}")

    @event("Created")
    def __init__(self, org_id: str, owner: str) -> None:
        self.org_id = org_id
        self.owner = owner
        self.names: list[str] = []

    def add(self, name: str) -> bool:
        if name in self.names:
            return False
        self._added(name=name)
        return True

    @event("Added")
    def _added(self, name: str) -> None:
        self.names.append(name)


class RevealRecord(Aggregate):
    """One reveal, a fact of its own: recording it loads nothing and conflicts with nothing."""

    @event("Recorded")
    def __init__(
        self,
        secret_id: str,
        name: str,
        owner: str,
        service: str,
        purpose: str,
        user_id: str,
        value_version: int,
        revealed_at: datetime,
        meta: Meta,
    ) -> None:
        self.secret_id = secret_id
        self.revealed_at = revealed_at


class Refusal(Aggregate):
    """A refused reveal, kept as a fact of its own (the secret may not exist)."""

    @event("Recorded")
    def __init__(
        self,
        name: str,
        scope: str,
        user_id: str,
        service: str,
        purpose: str,
        reason: str,
        denied_at: datetime,
        meta: Meta,
    ) -> None:
        self.name = name
        self.reason = reason


class RewrapRun(Aggregate):
    """One `gatehouse secrets rewrap` that moved data keys under the current master key."""

    @event("Recorded")
    def __init__(self, kid: str, count: int, from_kids: dict[str, int], at: datetime, meta: Meta) -> None:
        self.kid = kid
        self.count = count
