"""identity: users, orgs, admins and personal MCP API keys."""
