"""secrets: users' and orgs' credentials, envelope-encrypted, revealed only for a named use."""
