"""The fixture server of the official MCP conformance suite, written with the SDK's `MCPServer`.

    python tests/upstreams/conformance_server.py                  # stdio (behind Gatehouse)
    python tests/upstreams/conformance_server.py --http --port N  # Streamable HTTP at /mcp

`@modelcontextprotocol/conformance` (server scenarios) connects as a client and calls the
tools, resources and prompts below by name, expecting the contents its scenarios describe
(`npx @modelcontextprotocol/conformance list`; each scenario's description is its spec).
`infra/conformance.py` registers this file as a stdio upstream and runs the suite against
`/servers/<name>/mcp`, and with `--direct` against this server over HTTP as a baseline.
"""

import argparse
import asyncio
import base64
import json
from typing import Any

import mcp_types as types
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.prompts.base import UserMessage
from pydantic import BaseModel, Field

# A 1x1 PNG and a 44-byte WAV header with one silent sample.
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
WAV = "UklGRiYAAABXQVZFZm10IBAAAAABAAEAQB8AAAB9AAACABAAZGF0YQIAAAA="

server = MCPServer("gatehouse-conformance-upstream", version="1.0.0")
subscriptions: set[str] = set()


# -- tools ---------------------------------------------------------------------------------------
@server.tool()
def test_simple_text() -> str:
    """Answers with one text block."""
    return "This is a simple text response for testing."


@server.tool()
def test_image_content() -> list[types.ImageContent]:
    """Answers with a PNG image block."""
    return [types.ImageContent(type="image", data=PNG, mime_type="image/png")]


@server.tool()
def test_audio_content() -> list[types.AudioContent]:
    """Answers with a WAV audio block."""
    return [types.AudioContent(type="audio", data=WAV, mime_type="audio/wav")]


def _text_resource(uri: str, mime_type: str, text: str) -> types.EmbeddedResource:
    return types.EmbeddedResource(
        type="resource", resource=types.TextResourceContents(uri=uri, mime_type=mime_type, text=text)
    )


@server.tool()
def test_embedded_resource() -> list[types.EmbeddedResource]:
    """Answers with an embedded text resource."""
    return [_text_resource("test://embedded-resource", "text/plain", "This is an embedded resource content.")]


@server.tool()
def test_multiple_content_types() -> list[types.TextContent | types.ImageContent | types.EmbeddedResource]:
    """Answers with a text, an image and a resource block."""
    return [
        types.TextContent(type="text", text="Multiple content types test:"),
        types.ImageContent(type="image", data=PNG, mime_type="image/png"),
        _text_resource("test://mixed-content-resource", "application/json", '{"test":"data","value":123}'),
    ]


@server.tool()
async def test_tool_with_logging(ctx: Context) -> str:
    """Sends three info log notifications 50 ms apart while it runs."""
    for text in ("Tool execution started", "Tool processing data", "Tool execution completed"):
        await ctx.info(text)
        await asyncio.sleep(0.05)
    return "Tool with logging executed successfully"


@server.tool()
async def test_tool_with_progress(ctx: Context) -> str:
    """Reports progress 0, 50 and 100 of 100 (when the call carries a progress token)."""
    for step in (0, 50, 100):
        await ctx.report_progress(progress=step, total=100, message=f"Completed step {step} of 100")
        if step < 100:
            await asyncio.sleep(0.05)
    return "Tool with progress executed successfully"


@server.tool()
def test_error_handling() -> str:
    """Always fails: the client gets a result with isError true and this sentence."""
    raise ToolError("This tool intentionally returns an error for testing")


@server.tool()
async def test_sampling(prompt: str, ctx: Context) -> str:
    """Asks the client's LLM (sampling/createMessage) and answers with what it said."""
    try:
        answer = await ctx.session.create_message(
            messages=[
                types.SamplingMessage(role="user", content=types.TextContent(type="text", text=prompt))
            ],
            max_tokens=100,
        )
    except Exception as err:  # the client may not offer sampling: say so, as a result
        return f"Sampling not supported or error: {err}"
    content = answer.content
    return f"LLM response: {content.text if isinstance(content, types.TextContent) else 'no text'}"


class Contact(BaseModel):
    username: str = Field(description="User's response")
    email: str = Field(description="User's email address")


class Defaults(BaseModel):
    """SEP-1034: a default for every primitive type."""

    name: str = Field(default="John Doe", description="User name")
    age: int = Field(default=30, description="User age")
    score: float = Field(default=95.5, description="User score")
    status: str = Field(
        default="active",
        description="User status",
        json_schema_extra={"enum": ["active", "inactive", "pending"]},
    )
    verified: bool = Field(default=True, description="Verification status")


class Enums(BaseModel):
    """SEP-1330: the five enum shapes."""

    untitledSingle: str = Field(
        description="Single choice without titles",
        json_schema_extra={"enum": ["option1", "option2", "option3"]},
    )
    titledSingle: str = Field(
        description="Single choice with titles",
        json_schema_extra={
            "oneOf": [
                {"const": "value1", "title": "First Option"},
                {"const": "value2", "title": "Second Option"},
                {"const": "value3", "title": "Third Option"},
            ]
        },
    )
    legacyEnum: str = Field(
        description="Legacy titled enum",
        json_schema_extra={
            "enum": ["opt1", "opt2", "opt3"],
            "enumNames": ["Option One", "Option Two", "Option Three"],
        },
    )
    untitledMulti: list[str] = Field(
        description="Several choices without titles",
        json_schema_extra={"items": {"type": "string", "enum": ["option1", "option2", "option3"]}},
    )
    titledMulti: list[str] = Field(
        description="Several choices with titles",
        json_schema_extra={
            "items": {
                "anyOf": [
                    {"const": "value1", "title": "First Choice"},
                    {"const": "value2", "title": "Second Choice"},
                    {"const": "value3", "title": "Third Choice"},
                ]
            }
        },
    )


async def _elicit(ctx: Context, message: str, schema: type[BaseModel], label: str) -> str:
    try:
        answer = await ctx.elicit(message=message, schema=schema)
    except Exception as err:  # the client may not offer elicitation
        return f"Elicitation not supported or error: {err}"
    content = answer.data.model_dump_json() if answer.action == "accept" else "{}"
    return f"{label}: action={answer.action}, content={content}"


@server.tool()
async def test_elicitation(message: str, ctx: Context) -> str:
    """Asks the user (elicitation/create) for a username and an email."""
    return await _elicit(ctx, message, Contact, "User response")


@server.tool()
async def test_elicitation_sep1034_defaults(ctx: Context) -> str:
    """Elicitation whose schema has a default for every primitive type (SEP-1034)."""
    return await _elicit(ctx, "Please provide user information", Defaults, "Elicitation completed")


@server.tool()
async def test_elicitation_sep1330_enums(ctx: Context) -> str:
    """Elicitation whose schema has the five enum shapes (SEP-1330)."""
    return await _elicit(ctx, "Please pick values", Enums, "Elicitation completed")


@server.tool()
async def test_reconnection(ctx: Context) -> str:
    """SEP-1699: logs, closes its SSE stream (HTTP only), logs again, answers."""
    await ctx.info("Before disconnect")
    await ctx.close_sse_stream()
    await asyncio.sleep(0.2)
    await ctx.info("After reconnect")
    return "Reconnection test completed"


# `json-schema-2020-12` checks that `$schema`, `$defs` and `additionalProperties` of an input
# schema reach the client untouched, so this tool is added with its schema as written.
JSON_SCHEMA_2020_12: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "$defs": {
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
        }
    },
    "properties": {"name": {"type": "string"}, "address": {"$ref": "#/$defs/address"}},
    "additionalProperties": False,
}


@server.tool(description="Tool with JSON Schema 2020-12 features")
def json_schema_2020_12_tool(name: str = "", address: dict[str, str] | None = None) -> str:
    return f"name={name} address={json.dumps(address)}"


def _pin_schema() -> None:
    tool = server._tool_manager.get_tool("json_schema_2020_12_tool")  # no public setter
    assert tool is not None
    tool.parameters = JSON_SCHEMA_2020_12


_pin_schema()


# -- resources -------------------------------------------------------------------------------------
@server.resource("test://static-text", mime_type="text/plain", description="A static text resource")
def static_text() -> str:
    return "This is the content of the static text resource."


@server.resource("test://static-binary", mime_type="image/png", description="A static PNG image")
def static_binary() -> bytes:
    return base64.b64decode(PNG)


@server.resource("test://template/{id}/data", mime_type="application/json", description="Data for an id")
def template_data(id: str) -> str:
    return json.dumps({"id": id, "templateTest": True, "data": f"Data for ID: {id}"})


@server.resource("test://watched-resource", mime_type="text/plain", description="A resource to subscribe to")
def watched() -> str:
    return "Watched resource content"


# -- prompts -------------------------------------------------------------------------------------
@server.prompt()
def test_simple_prompt() -> list[UserMessage]:
    """A prompt without arguments."""
    return [UserMessage("This is a simple prompt for testing.")]


@server.prompt()
def test_prompt_with_arguments(arg1: str, arg2: str) -> list[UserMessage]:
    """A prompt with two required arguments."""
    return [UserMessage(f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'")]


@server.prompt()
def test_prompt_with_embedded_resource(resourceUri: str) -> list[UserMessage]:
    """A prompt that embeds the resource it is given."""
    return [
        UserMessage(_text_resource(resourceUri, "text/plain", "Embedded resource content for testing.")),
        UserMessage("Please process the embedded resource above."),
    ]


@server.prompt()
def test_prompt_with_image() -> list[UserMessage]:
    """A prompt with an image."""
    return [
        UserMessage(types.ImageContent(type="image", data=PNG, mime_type="image/png")),
        UserMessage("Please analyze the image above."),
    ]


@server.completion()
async def complete(ref: Any, argument: types.CompletionArgument, context: Any) -> types.Completion:
    """Suggests nothing: the suite only checks the shape of the answer."""
    return types.Completion(values=[], total=0, has_more=False)


# -- handshake-era methods MCPServer has no decorator for ------------------------------------------
async def _subscribe(ctx: Any, params: types.SubscribeRequestParams) -> types.EmptyResult:
    subscriptions.add(str(params.uri))
    return types.EmptyResult()


async def _unsubscribe(ctx: Any, params: types.UnsubscribeRequestParams) -> types.EmptyResult:
    subscriptions.discard(str(params.uri))
    return types.EmptyResult()


async def _set_level(ctx: Any, params: types.SetLevelRequestParams) -> types.EmptyResult:
    return types.EmptyResult()


_lowlevel = server._lowlevel_server  # the SDK's route for legacy methods
_lowlevel.add_request_handler("resources/subscribe", types.SubscribeRequestParams, _subscribe)
_lowlevel.add_request_handler("resources/unsubscribe", types.UnsubscribeRequestParams, _unsubscribe)
_lowlevel.add_request_handler("logging/setLevel", types.SetLevelRequestParams, _set_level)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", action="store_true")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    if args.http:
        server.run("streamable-http", host="127.0.0.1", port=args.port)
    else:
        server.run()


if __name__ == "__main__":
    main()
