"""Benchmarks of a running (or freshly started) Gatehouse; see bench/README.md."""
