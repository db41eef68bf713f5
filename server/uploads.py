"""Uploads being received by the aggregator (Fleet.UploadMasked): the (round, site) slot is
claimed at the first chunk, so a concurrent second upload of it is refused; the bytes all
uploads announce are capped together; an upload idle too long, or whose round left its
upload phase, is cancelled by the service's ticker (`Uploads.reap`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from fleetmind.aggregation.secagg import ProtocolError
from fleetmind.server.coordinator import RefusedError
from fleetmind.server.limits import ServerLimits

log = logging.getLogger(__name__)


@dataclass
class Upload:
    round_id: int
    site: int
    total_bytes: int
    context: grpc.ServicerContext
    last_chunk: float = field(default_factory=time.monotonic)


class Uploads:
    """Uploads being received: one per (round, site) at a time, their announced bytes
    within `max_upload_bytes_in_flight` together, each cancelled when it idles past
    `upload_idle_s` or its round stops collecting (`reap`, from the ticker)."""

    def __init__(self, limits: ServerLimits, refused: Callable[[str], None]) -> None:
        self.limits = limits
        self.refused = refused
        self._lock = threading.Lock()
        self._open: dict[tuple[int, int], Upload] = {}

    def claim(self, round_id: int, site: int, total_bytes: int,
              context: grpc.ServicerContext) -> Upload:
        with self._lock:
            if (round_id, site) in self._open:
                raise ProtocolError("replay", f"site {site} is already uploading its vector "
                                              f"for round {round_id}: one upload at a time")
            held = sum(u.total_bytes for u in self._open.values())
            cap = self.limits.max_upload_bytes_in_flight
            if held + total_bytes > cap:
                raise RefusedError("upload_bytes", f"uploads in flight hold {held} bytes; "
                                                   f"{total_bytes} more would pass the "
                                                   f"{cap}-byte limit; retry shortly")
            upload = Upload(round_id, site, total_bytes, context)
            self._open[(round_id, site)] = upload
            return upload

    def release(self, upload: Upload) -> None:
        with self._lock:
            if self._open.get((upload.round_id, upload.site)) is upload:
                del self._open[(upload.round_id, upload.site)]

    def reap(self, collecting: Callable[[int], bool]) -> int:
        """Cancels uploads idle too long or whose round left its upload phase."""
        now = time.monotonic()
        with self._lock:
            open_ = list(self._open.values())
        expired = []
        for upload in open_:
            if now - upload.last_chunk > self.limits.upload_idle_s:
                expired.append((upload, "upload_idle"))
            elif not collecting(upload.round_id):
                expired.append((upload, "upload_past_phase"))
        for upload, reason in expired:
            log.info("cancelling site %d's upload for round %d: %s", upload.site,
                     upload.round_id, reason)
            self.refused(reason)
            upload.context.cancel()
            self.release(upload)
        return len(expired)

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)
