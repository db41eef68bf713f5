"""fleetmind as a Flower app: the same consolidation and exact merge on Flower's engine."""
