"""Decoding an upstream's tools/list result into the contract's `Tool`.

The contract's `Tool.annotations` is `msgspec.Raw | None`, a type msgspec encodes but can
only decode from `null`; upstream listings are therefore decoded with this struct (an
absent field is an empty Raw) and converted.
"""

import msgspec

from contracts.commands.mcp import Tool

_ABSENT = msgspec.Raw(b"")


class _UpstreamTool(msgspec.Struct):
    name: str
    description: str | None = None
    inputSchema: msgspec.Raw = msgspec.Raw(b'{"type":"object"}')
    annotations: msgspec.Raw = _ABSENT
    title: str | None = None


class ToolPage(msgspec.Struct):
    tools: list[_UpstreamTool] = msgspec.field(default_factory=list)
    nextCursor: str | None = None


decode_tool_page = msgspec.json.Decoder(ToolPage).decode


def contract_tools(page: ToolPage) -> list[Tool]:
    return [
        Tool(
            name=t.name,
            description=t.description,
            inputSchema=t.inputSchema,
            annotations=t.annotations if t.annotations and bytes(t.annotations) != b"null" else None,
            title=t.title,
        )
        for t in page.tools
    ]
