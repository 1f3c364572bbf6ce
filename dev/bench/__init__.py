"""Benchmarks: random-weight models of a given size, timed and measured (see README.md: Performance)."""
