"""Decoding an upstream's tools/list result into the contract's `Tool` (fields the contract
does not carry, such as `outputSchema` or `icons`, are dropped)."""

import msgspec

from contracts.commands.mcp import ABSENT, Tool


class ToolPage(msgspec.Struct):
    tools: list[Tool] = msgspec.field(default_factory=list)
    nextCursor: str | None = None


decode_tool_page = msgspec.json.Decoder(ToolPage).decode


def contract_tools(page: ToolPage) -> list[Tool]:
    """The page's tools; `"annotations": null` is kept as absent."""
    return [
        t if bytes(t.annotations) != b"null" else msgspec.structs.replace(t, annotations=ABSENT)
        for t in page.tools
    ]
