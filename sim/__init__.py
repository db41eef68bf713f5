"""The simulated fleet, which drives both sides: the toy world, the toy base-model builder,
the in-process demo, the benchmarks, and the `fleetmind` command line.
"""
