"""mcp_proxy: the registry of upstream MCP servers and the execution of tool calls on them."""
