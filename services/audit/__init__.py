"""audit: a tamper-evident trail of every event, hash-chained per org, rebuilt from the stream."""
