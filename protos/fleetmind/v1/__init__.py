"""Generated stubs of `fleetmind.v1`: do not edit; run `python -m fleetmind.protos.regenerate`."""
