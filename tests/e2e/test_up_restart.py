"""Ctrl-C and `gatehouse up` again on the same data dir: a clean stop leaves no process
behind, and the second run keeps everything the first one recorded."""

import re

import httpx
import pytest

from tests.e2e.conftest import Platform, processes_of
from tests.helpers import eventually_sync

pytestmark = pytest.mark.e2e

KEYS = "/v1/users/me/mcp-keys"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def accepted(http: httpx.Client, key: str) -> bool:
    return http.get("/v1/me", headers=auth(key)).status_code == 200


def test_stop_leaves_nothing_running_and_a_restart_keeps_everything(platform: Platform) -> None:
    admin_key = platform.admin_key
    with platform.client() as http:
        made = http.post("/v1/admin/users", json={"email": "dev@example.test"}, headers=auth(admin_key))
        assert made.status_code == 201, made.text
        dev = made.json()
        eventually_sync(lambda: accepted(http, dev["api_key"]), timeout=15)
        issued = http.post(KEYS, json={"name": "old laptop"}, headers=auth(dev["api_key"]))
        assert issued.status_code == 201, issued.text
        old = issued.json()
        eventually_sync(lambda: accepted(http, old["api_key"]), timeout=15)
        assert http.delete(f"{KEYS}/{old['id']}", headers=auth(dev["api_key"])).status_code == 204

        def trail_has_the_revocation() -> list[str] | None:
            page = http.get("/v1/audit", params={"limit": 500}, headers=auth(admin_key)).json()["items"]
            return [e["id"] for e in page] if any(e["action"] == "api_key.revoked" for e in page) else None

        entries_before = eventually_sync(trail_has_the_revocation, timeout=30)

    assert platform.descendants, "`gatehouse up` runs its services as child processes"
    running = [" ".join(p.cmdline()) for p in processes_of(platform.data_dir)]
    assert any("postgres" in c for c in running) and any("nats-server" in c for c in running), running
    code = platform.stop()
    assert code == 0, f"exit code {code}\n{platform.output}"
    assert platform.output.rstrip().endswith("Stopped."), platform.output
    try:
        eventually_sync(lambda: not platform.leftovers(), timeout=30)
    except AssertionError:
        raise AssertionError(f"still running after the stop: {platform.leftovers()}") from None
    assert not (platform.data_dir / "runtime.json").exists()

    out = platform.start()
    assert "Admin user admin@gatehouse.local already exists" in out, out
    assert not re.search(r"Admin API key", out), "the admin key is printed on the first run only"
    assert admin_key not in out
    with platform.client() as http:
        me = http.get("/v1/me", headers=auth(admin_key))
        assert me.status_code == 200 and me.json()["is_admin"] is True, me.text
        assert http.get("/v1/me", headers=auth(dev["api_key"])).status_code == 200
        revoked = http.get("/v1/me", headers=auth(old["api_key"]))
        assert revoked.status_code == 401 and "revoked" in revoked.json()["detail"], revoked.text
        users = http.get("/v1/admin/users", headers=auth(admin_key)).json()
        assert "dev@example.test" in {u["email"] for u in users}
        page = http.get("/v1/audit", params={"limit": 500}, headers=auth(admin_key)).json()["items"]
        assert set(entries_before) <= {e["id"] for e in page}, "the audit trail lost entries"

    verified = platform.cli("audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
