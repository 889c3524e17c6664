"""Request/reply commands (subjects `cmd.<service>.<verb>`) and their replies."""
