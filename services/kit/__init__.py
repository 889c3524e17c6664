"""The thin runtime kit every service uses: config, logs, traces, bus, outbox, projections."""
