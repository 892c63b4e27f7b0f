"""Benchmarks for tallstore (not part of the installed package)."""
