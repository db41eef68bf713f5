"""What tests share: fixtures (support.fixtures, registered by tests/conftest.py), the toy
fleet's settings, round drivers and helpers. pyproject's `pythonpath` puts tests/ on the
path, so tests under unit/ and integration/ import from here (`from support.toy_fleet
import FAST`), never from each other."""
