"""Benchmarks: timing claims live here, not in the test suite (see bench/README.md)."""
