"""Root conftest: the shared fixtures of tests/support/fixtures.py, seen by tests/unit/,
tests/integration/ and anything still at the top of tests/. `support` imports as a
top-level package: pyproject's `pythonpath` puts tests/ on the path."""

pytest_plugins = ["support.fixtures"]
