"""What an event type means in the trail: its action (`category.operation`) and its resource.

Known types are listed; any other type is read generically from its name
(`<service>.<noun>_<verb>` -> `noun.verb`) so a new service is audited without code here.
"""

from typing import Any

import msgspec


class Meaning(msgspec.Struct, frozen=True):
    action: str
    resource_type: str
    resource_fields: tuple[str, ...]  # payload fields naming the resource, first present wins


CATALOGUE: dict[str, Meaning] = {
    "identity.org_created": Meaning("org.created", "org", ("org_id",)),
    "identity.user_registered": Meaning("user.registered", "user", ("user_id",)),
    "identity.tier_changed": Meaning("user.tier_changed", "user", ("user_id",)),
    "identity.api_key_issued": Meaning("api_key.issued", "api_key", ("key_id",)),
    "identity.api_key_revoked": Meaning("api_key.revoked", "api_key", ("key_id",)),
    "identity.api_key_used": Meaning("api_key.used", "api_key", ("key_id",)),
    # A refused key: the key's id when identity knows it (revoked, expired), else its prefix.
    "gateway.auth_failed": Meaning("auth.failed", "api_key", ("key_id", "key_prefix")),
}


def meaning_of(event_type: str) -> Meaning:
    known = CATALOGUE.get(event_type)
    if known is not None:
        return known
    service, _, name = event_type.partition(".")
    name = name.replace(".", "_")
    if not name:  # a type without a service part
        service, name = "event", service or "unknown"
    noun, _, verb = name.rpartition("_")
    category = noun or service
    return Meaning(f"{category}.{verb}", category, (f"{category}_id", "id", "name"))


def action_for(event_type: str) -> str:
    return meaning_of(event_type).action


def resource_id(meaning: Meaning, data: dict[str, Any]) -> str:
    for field in meaning.resource_fields:
        value = data.get(field)
        if isinstance(value, str | int) and not isinstance(value, bool):
            return str(value)
    return ""


def subject_user(data: dict[str, Any]) -> str | None:
    """The user an event is about, who may read the entry even when someone else acted."""
    value = data.get("user_id")
    return value if isinstance(value, str) and value else None


def outcome_of(data: dict[str, Any]) -> str:
    """Facts are successes unless the payload says otherwise (e.g. a failed tool call)."""
    value = data.get("outcome")
    return value if isinstance(value, str) and value else "success"
