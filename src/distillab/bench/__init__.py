"""Benchmarks: multi-seed suites (and, later, throughput)."""
