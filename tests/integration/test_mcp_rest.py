"""The `/v1/mcp/...` REST routes, with fake_mcp_proxy answering `cmd.mcp_proxy.*` over real NATS:
who the caller is comes from the key, bad bodies are 400s with a sentence, org scope is for
admins, other people's servers do not exist.
"""

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from contracts.commands.mcp import SecretRef
from tests.integration.mcp_world import World, bearer, mcp_world, platform_settings

pytestmark = pytest.mark.integration

PROBLEM_JSON = "application/problem+json"


@pytest.fixture(scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory, postgres_server: str) -> AsyncIterator[World]:
    with platform_settings(tmp_path_factory, postgres_server) as settings:
        async with mcp_world(settings) as w:
            yield w


def problem(answer: httpx.Response, status: int, fragment: str = "") -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith(PROBLEM_JSON)
    body: dict[str, Any] = answer.json()
    assert body["status"] == status and body["detail"]
    assert fragment.lower() in body["detail"].lower(), body["detail"]
    return body


async def test_register_list_test_and_remove_a_server(world: World) -> None:
    http, key = world.http[0], world.bea.api_key
    body = {
        "name": "gh-enterprise",
        "transport": "http",
        "url": "https://mcp.example.com/mcp",
        "headers": {"Authorization": {"secret": "github_token"}, "X-Team": "platform"},
        "timeout_s": 12.5,
    }
    created = await http.post("/v1/mcp/servers", json=body, headers=bearer(key))
    assert created.status_code == 201, created.text
    assert created.json() == {
        "name": "gh-enterprise",
        "transport": "http",
        "status": "ok",
        "tools_count": 8,
        "requires_auth": True,
        "scope": "user",
        "error": None,
    }
    registered = next(r for (owner, name), r in world.proxy.registered.items() if name == "gh-enterprise")
    assert registered.owner == world.bea.user_id and registered.scope == "user"
    assert registered.spec.headers == {
        "Authorization": SecretRef(secret="github_token"),
        "X-Team": "platform",
    }
    assert registered.spec.timeout_s == 12.5 and registered.spec.url == "https://mcp.example.com/mcp"

    listed = await world.http[1].get("/v1/mcp/servers", headers=bearer(key))
    assert listed.status_code == 200
    names = {s["name"]: s for s in listed.json()}
    assert set(names) == {"gh-enterprise", "notes", "wiki"}  # hers and the org's
    assert names["wiki"]["scope"] == "org" and set(names["notes"]) >= {
        "name",
        "transport",
        "status",
        "tools_count",
        "requires_auth",
    }

    probed = await http.post("/v1/mcp/servers/gh-enterprise/test", headers=bearer(key))
    assert probed.status_code == 200 and probed.json()["name"] == "gh-enterprise"
    problem(await http.post("/v1/mcp/servers/nope/test", headers=bearer(key)), 404, "nope")
    problem(await http.post("/v1/mcp/servers", json=body, headers=bearer(key)), 409, "already exists")

    removed = await http.delete("/v1/mcp/servers/gh-enterprise", headers=bearer(key))
    assert removed.status_code == 204, removed.text
    listed = await http.get("/v1/mcp/servers", headers=bearer(key))
    assert "gh-enterprise" not in {s["name"] for s in listed.json()}


async def test_stdio_server_with_secret_env(world: World) -> None:
    body = {
        "name": "fs",
        "transport": "stdio",
        "command": "python",
        "args": ["-m", "fs_server"],
        "env": {"TOKEN": {"secret": "fs.token"}, "MODE": "ro"},
    }
    created = await world.http[0].post("/v1/mcp/servers", json=body, headers=bearer(world.bea.api_key))
    assert created.status_code == 201, created.text
    spec = world.proxy.registered[(world.bea.user_id, "fs")].spec
    assert spec.command == "python" and spec.args == ["-m", "fs_server"]
    assert spec.env == {"TOKEN": SecretRef(secret="fs.token"), "MODE": "ro"}
    assert (
        await world.http[0].delete("/v1/mcp/servers/fs", headers=bearer(world.bea.api_key))
    ).status_code == 204


async def test_org_scope_is_for_admins(world: World) -> None:
    body = {"name": "shared", "transport": "sse", "url": "http://10.0.0.5:9000/sse", "scope": "org"}
    problem(
        await world.http[0].post("/v1/mcp/servers", json=body, headers=bearer(world.ann.api_key)),
        403,
        "admin",
    )
    assert not any(name == "shared" for (_, name) in world.proxy.registered)
    created = await world.http[0].post("/v1/mcp/servers", json=body, headers=bearer(world.admin.api_key))
    assert created.status_code == 201, created.text
    assert created.json()["scope"] == "org"
    assert world.proxy.registered[(world.users["admin"].org_id, "shared")].scope == "org"
    seen_by_ann = await world.http[1].get("/v1/mcp/servers", headers=bearer(world.ann.api_key))
    assert "shared" in {s["name"] for s in seen_by_ann.json()}
    # Removing it: the org's servers are the admins' too.
    ann_removes = await world.http[0].delete(
        "/v1/mcp/servers/shared?scope=org", headers=bearer(world.ann.api_key)
    )
    problem(ann_removes, 403, "admin")
    problem(
        await world.http[0].delete("/v1/mcp/servers/shared", headers=bearer(world.ann.api_key)), 404, "shared"
    )
    removed = await world.http[0].delete(
        "/v1/mcp/servers/shared?scope=org", headers=bearer(world.admin.api_key)
    )
    assert removed.status_code == 204, removed.text
    assert (world.users["admin"].org_id, "shared") not in world.proxy.registered
    problem(
        await world.http[0].delete("/v1/mcp/servers/x?scope=everyone", headers=bearer(world.admin.api_key)),
        400,
    )


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"name": "x", "transport": "stdio"}, "command"),
        ({"name": "x", "transport": "http"}, "url"),
        ({"name": "x", "transport": "ftp", "url": "http://a"}, "transport"),
        ({"name": "bad name", "transport": "stdio", "command": "c"}, "name"),
        ({"name": "a__b", "transport": "stdio", "command": "c"}, "name"),
        ({"name": "x_", "transport": "stdio", "command": "c"}, "name"),
        ({"name": "servers", "transport": "stdio", "command": "c"}, "reserved"),
        ({"name": "x", "transport": "http", "url": "ftp://host/x"}, "url"),
        ({"name": "x", "transport": "stdio", "command": "c", "timeout_s": 0}, "timeout_s"),
        ({"name": "x", "transport": "stdio", "command": "c", "timeout_s": 301}, "timeout_s"),
        ({"name": "x", "transport": "stdio", "command": "c", "env": {"T": {"secret": "Bad Name"}}}, "env"),
        ({"name": "x", "transport": "stdio", "command": "c", "env": {"T": {"secret": "ok", "x": 1}}}, "env"),
        ({"name": "x", "transport": "stdio", "command": "c", "env": {"1BAD": "v"}}, "env"),
        ({"name": "x", "transport": "stdio", "command": "c", "headers": {"A": "b"}}, "headers"),
        ({"name": "x", "transport": "http", "url": "http://h", "env": {"A": "b"}}, "env"),
        ({"name": "x", "transport": "stdio", "command": "c", "user_id": "someone-else"}, "user_id"),
        ({"transport": "stdio", "command": "c"}, "name"),
    ],
)
async def test_bad_server_bodies_are_400_with_a_sentence(
    world: World, body: dict[str, Any], fragment: str
) -> None:
    before = len(world.proxy.registered)
    answer = await world.http[0].post("/v1/mcp/servers", json=body, headers=bearer(world.ann.api_key))
    problem(answer, 400, fragment)
    assert len(world.proxy.registered) == before


async def test_another_users_server_is_not_found(world: World) -> None:
    bea = bearer(world.bea.api_key)
    problem(await world.http[0].delete("/v1/mcp/servers/github", headers=bea), 404, "github")
    assert (world.ann.user_id, "github") in world.proxy.registered
    problem(await world.http[0].get("/v1/mcp/github/tools", headers=bea), 404, "github")
    execute = await world.http[0].post("/v1/mcp/github/execute", json={"tool_name": "echo"}, headers=bea)
    problem(execute, 404, "github")


async def test_tools_of_a_server(world: World) -> None:
    answer = await world.http[0].get("/v1/mcp/github/tools", headers=bearer(world.ann.api_key))
    assert answer.status_code == 200, answer.text
    tools = {t["name"]: t for t in answer.json()}
    assert tools["echo"] == {
        "name": "echo",
        "description": "Echoes its arguments back",
        "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}},
    }
    assert tools["fail"]["inputSchema"] == {"type": "object"}


async def test_execute_and_history(world: World) -> None:
    ann = bearer(world.ann.api_key)
    key = f"idem-{uuid.uuid4()}"
    answer = await world.http[0].post(
        "/v1/mcp/github/execute",
        json={"tool_name": "echo", "arguments": {"text": "rest"}},
        headers={**ann, "X-Request-Id": key},
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["request_id"] == key and body["server"] == "github" and body["tool_name"] == "echo"
    assert body["status"] == "success" and body["error"] is None
    assert body["result"]["content"][0]["type"] == "text" and body["duration_ms"] >= 0 and body["timestamp"]
    sent = world.proxy.calls[-1]
    assert sent.request_id == key and sent.caller.user_id == world.ann.user_id and sent.tool == "echo"

    generated = await world.http[1].post("/v1/mcp/jira/execute", json={"tool_name": "fail"}, headers=ann)
    assert generated.status_code == 200
    assert uuid.UUID(generated.json()["request_id"])
    assert generated.json()["status"] == "error" and generated.json()["result"]["isError"] is True
    timed_out = await world.http[0].post("/v1/mcp/github/execute", json={"tool_name": "timeout"}, headers=ann)
    assert timed_out.json()["status"] == "timeout" and "timed out" in timed_out.json()["error"]
    problem(
        await world.http[0].post("/v1/mcp/github/execute", json={"tool_name": "quota"}, headers=ann),
        429,
        "quota",
    )
    problem(
        await world.http[0].post("/v1/mcp/github/execute", json={"arguments": {}}, headers=ann),
        400,
        "tool_name",
    )
    problem(
        await world.http[0].post(
            "/v1/mcp/github/execute", json={"tool_name": "echo", "arguments": [1]}, headers=ann
        ),
        400,
        "arguments",
    )

    history = await world.http[0].get("/v1/mcp/requests/history", params={"limit": 2}, headers=ann)
    assert history.status_code == 200, history.text
    page = history.json()
    assert set(page) == {"items", "next_cursor"} and len(page["items"]) == 2
    assert page["items"][0]["request_id"] == timed_out.json()["request_id"]  # newest first
    assert set(page["items"][0]) >= {
        "request_id",
        "server",
        "tool_name",
        "status",
        "duration_ms",
        "timestamp",
    }
    jira = await world.http[0].get("/v1/mcp/requests/history", params={"server": "jira"}, headers=ann)
    assert {i["server"] for i in jira.json()["items"]} == {"jira"}
    bea = await world.http[0].get("/v1/mcp/requests/history", headers=bearer(world.bea.api_key))
    assert key not in {i["request_id"] for i in bea.json()["items"]}
    problem(
        await world.http[0].get("/v1/mcp/requests/history", params={"limit": 0}, headers=ann), 400, "limit"
    )


async def test_routes_need_a_key(world: World) -> None:
    for method, path in (
        ("GET", "/v1/mcp/servers"),
        ("POST", "/v1/mcp/servers"),
        ("GET", "/v1/mcp/github/tools"),
        ("POST", "/v1/mcp/github/execute"),
        ("GET", "/v1/mcp/requests/history"),
    ):
        problem(await world.http[0].request(method, path), 401, "key")


async def test_the_routes_are_in_the_openapi_schema(world: World) -> None:
    schema = (await world.http[0].get("/schema/openapi.json")).json()
    for path in (
        "/v1/mcp/servers",
        "/v1/mcp/servers/{name}",
        "/v1/mcp/servers/{name}/test",
        "/v1/mcp/{server}/tools",
        "/v1/mcp/{server}/execute",
        "/v1/mcp/requests/history",
    ):
        assert path in schema["paths"], path
