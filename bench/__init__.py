"""Benchmarks and GPU smoke runs; never part of the CPU test suite."""
