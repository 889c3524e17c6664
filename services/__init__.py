"""Gatehouse services: one package per service, plus `kit` (the thin runtime they share)."""
