"""Identity's command handlers: load, decide, save (synchronous; run them in a worker thread)."""

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.persistence import IntegrityError

from services.identity.domain import (
    PREFIX_LENGTH,
    Conflict,
    EmailClaim,
    Meta,
    NotFound,
    Org,
    User,
    check_tier,
    hash_key,
    mint_key,
    normalize_email,
    normalize_org,
)
from services.kit import deadline as deadlines
from services.kit.eventstore import retrying

T = TypeVar("T")


def now() -> datetime:
    return datetime.now(UTC)


class Identity(Application[uuid.UUID]):
    name = "identity"
    snapshotting_intervals = {User: 100}

    def __init__(self, pepper: bytes, env: dict[str, str] | None = None) -> None:
        super().__init__(env=env)
        self.pepper = pepper
        self.on_saved: Callable[[], None] = lambda: None

    def save(self, *objs: Any, **kwargs: Any) -> Any:
        deadlines.check()  # the caller still waits: otherwise a "503, try again" would happen anyway
        return super().save(*objs, **kwargs)

    def _notify(self, recordings: Any) -> None:  # called after every save
        super()._notify(recordings)
        self.on_saved()

    # -- users ------------------------------------------------------------------------
    def create_user(
        self,
        email: str,
        org: str | None,
        tier: str,
        is_admin: bool,
        key_name: str,
        meta: Meta,
        org_id: str | None = None,
    ) -> tuple[User, str, str]:
        """Registers a user with a first key; returns (user, key_id, api_key)."""
        email = normalize_email(email)
        check_tier(tier)
        org_name = normalize_org(org) if org else f"personal-{uuid.uuid4().hex[:12]}"
        for _attempt in range(3):
            org_agg = (
                self._existing_org(org_id) if org_id else self._org(org_name, personal=org is None, meta=meta)
            )
            user = User(email=email, org_id=str(org_agg.id), tier=tier, is_admin=is_admin, meta=meta)
            org_agg.add_member(user_id=str(user.id), meta=meta)
            claim = EmailClaim(email=email, user_id=str(user.id))
            api_key = mint_key()
            key_id = user.issue_key(
                key_name, hash_key(api_key, self.pepper), api_key[:PREFIX_LENGTH], now(), None, meta
            )
            try:
                self.save(org_agg, user, claim)
            except IntegrityError:
                if self._email_taken(email):
                    raise Conflict(f"a user with email {email} already exists") from None
                continue  # the org was created or changed concurrently: load it again
            return user, key_id, api_key
        raise Conflict("the org changed concurrently; try again")

    def _org(self, name: str, personal: bool, meta: Meta) -> Org:
        org_id = Org.create_id(name, personal, meta)
        try:
            org: Org = self.repository.get(org_id)
            return org
        except AggregateNotFoundError:
            return Org(name=name, personal=personal, meta=meta)

    def _existing_org(self, org_id: str) -> Org:
        try:
            org: Org = self.repository.get(uuid.UUID(org_id))
        except (AggregateNotFoundError, ValueError):
            raise NotFound(f"no org {org_id}") from None
        return org

    def _email_taken(self, email: str) -> bool:
        try:
            self.repository.get(EmailClaim.create_id(email, ""))
            return True
        except AggregateNotFoundError:
            return False

    def user_by_email(self, email: str) -> User | None:
        try:
            claim: EmailClaim = self.repository.get(EmailClaim.create_id(normalize_email(email), ""))
        except AggregateNotFoundError:
            return None
        return self.user(claim.user_id)

    def user(self, user_id: str) -> User:
        try:
            user: User = self.repository.get(uuid.UUID(user_id))
        except (AggregateNotFoundError, ValueError):
            raise NotFound(f"no user {user_id}") from None
        if not isinstance(user, User):
            raise NotFound(f"no user {user_id}")
        return user

    def org_users(self, org_id: str) -> list[User]:
        try:
            org: Org = self.repository.get(uuid.UUID(org_id))
        except (AggregateNotFoundError, ValueError):
            return []
        return [self.user(uid) for uid in org.members]

    def set_tier(self, org_id: str, user_id: str, tier: str, meta: Meta) -> User:
        def attempt() -> User:
            user = self.user(user_id)
            if user.org_id != org_id:
                raise NotFound(f"no user {user_id}")  # another org's user is invisible
            if user.set_tier(tier, meta):
                self.save(user)
            return user

        return retrying(attempt)

    # -- keys -------------------------------------------------------------------------
    def issue_key(
        self, user_id: str, name: str, expires_in_days: int | None, meta: Meta
    ) -> tuple[User, str, str]:
        api_key = mint_key()

        def attempt() -> tuple[User, str, str]:
            user = self.user(user_id)
            key_id = user.issue_key(
                name,
                hash_key(api_key, self.pepper),
                api_key[:PREFIX_LENGTH],
                now(),
                expires_in_days,
                meta,
            )
            self.save(user)
            return user, key_id, api_key

        return retrying(attempt)

    def revoke_key(self, user_id: str, key_id: str, meta: Meta) -> None:
        def attempt() -> None:
            user = self.user(user_id)
            if user.revoke_key(key_id, now(), meta):
                self.save(user)

        retrying(attempt)

    def touch_key(self, user_id: str, key_id: str, used_at: datetime) -> None:
        def attempt() -> None:
            try:
                user = self.user(user_id)
            except NotFound:
                return
            if user.touch_key(key_id, used_at):
                self.save(user)

        retrying(attempt)
