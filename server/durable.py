"""The aggregator's names for the shared durable-file helpers (fleetmind.runtime.durable)
and canonical JSON (fleetmind.runtime.signed_log): one implementation, both sides."""

from fleetmind.runtime.durable import atomic_write, fsync_dir, write_synced
from fleetmind.runtime.signed_log import canonical_json

__all__ = ["atomic_write", "canonical_json", "fsync_dir", "write_synced"]
