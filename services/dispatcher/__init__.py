"""dispatcher: accepts builds, queues them for runner nodes, and owns their lifecycle."""
