"""Generated stubs of the `fleetmind.v1` wire contract (protos/fleetmind/v1/*.proto)."""
