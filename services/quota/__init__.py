"""quota: the ledger of tool calls, build slots and upstream servers per user, by tier."""
