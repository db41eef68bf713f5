"""Benchmarks: each measures fleetmind against its peer side by side in one run and writes
JSON plus a table of ratios."""
