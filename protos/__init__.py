"""The wire contract, `fleetmind/v1/*.proto`, and its generated stubs. No logic."""
