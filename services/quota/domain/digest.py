"""A fingerprint of the ledger's balances, and the differences between two ledgers.

Only what a rebuild must reproduce goes in: non-zero balances and the running totals.
Which settled keys are still remembered (for dedupe) does not, so pruning never changes it.
"""

import hashlib

import msgspec

from services.quota.domain.ledger import Ledger


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    """The balances of a ledger at one position of its log (a copy: the ledger moves on)."""

    balances: dict[str, int]
    totals: dict[str, int]
    position: int
    anomalies: tuple[str, ...] = ()


class Fingerprint(msgspec.Struct, frozen=True, kw_only=True):
    users: int
    reservations: int
    open: int
    charged_calls: int
    digest: str
    position: int


def snapshot(ledger: Ledger, position: int) -> Snapshot:
    return Snapshot(
        balances=ledger.balances(),
        totals={
            "users": len(ledger.users),
            "reservations": ledger.reserved_total,
            "open": ledger.open,
            "charged calls": ledger.charged_total,
        },
        position=position,
        anomalies=tuple(ledger.anomalies),
    )


def fingerprint(snap: Snapshot) -> Fingerprint:
    h = hashlib.sha256()
    for name, value in sorted(snap.balances.items()):
        h.update(f"{name}\t{value}\n".encode())
    for name, value in snap.totals.items():
        h.update(f"total {name}\t{value}\n".encode())
    return Fingerprint(
        users=snap.totals["users"],
        reservations=snap.totals["reservations"],
        open=snap.totals["open"],
        charged_calls=snap.totals["charged calls"],
        digest=h.hexdigest(),
        position=snap.position,
    )


def differences(live: Snapshot, rebuilt: Snapshot, limit: int = 100) -> list[str]:
    """One sentence per difference, e.g. `user u calls 2026-11 charged: live 3, rebuilt 2`."""
    out: list[str] = []
    a, b = live.balances, rebuilt.balances
    for name in sorted(a.keys() | b.keys()):
        if a.get(name, 0) != b.get(name, 0):
            out.append(f"{name}: live {a.get(name, 0)}, rebuilt {b.get(name, 0)}")
    for name, value in live.totals.items():
        if rebuilt.totals.get(name) != value:
            out.append(f"total {name}: live {value}, rebuilt {rebuilt.totals.get(name)}")
    out.extend(f"rebuilt log: {anomaly}" for anomaly in rebuilt.anomalies[:10])
    if len(out) > limit:
        out = [*out[:limit], f"... and {len(out) - limit} more"]
    return out
