"""The fleetmind program: each side registers its own commands here."""
