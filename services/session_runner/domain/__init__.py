"""A runner node's rules, with no I/O: the worker protocol, output lines, outcomes, the agent."""
