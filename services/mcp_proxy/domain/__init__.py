"""mcp_proxy's rules, with no I/O: registrations, URLs, pool keys, call facts, history pages."""
