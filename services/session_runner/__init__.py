"""session_runner: a node agent that runs builds, one worker process each, up to its capacity."""
