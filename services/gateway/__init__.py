"""gateway: the only public HTTP surface (Litestar), and later the MCP endpoint."""
