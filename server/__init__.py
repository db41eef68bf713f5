"""The aggregator: gRPC services, round/cohort coordinator, signed version registry,
ledger and metrics.

Never imports torch, transformers or `fleetmind.client`: the aggregator installs and runs
without them (tests/integration/test_boundaries.py guards this).
"""
