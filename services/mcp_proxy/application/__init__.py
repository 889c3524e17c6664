"""mcp_proxy's use cases: registry, calls, recording, history; ports for what they need."""
