"""Which version serves a request, and which loaded adapters may go.

The site's active version is its `current` link (client/versions.py), flipped atomically by
activation or rollback; reading it per request costs one readlink, so a new request sees a
new version at once, with no polling and no restart. A request pins the version it started
with until its last byte is sent; a superseded adapter is unloaded only when no request
pins it and it is not among the `keep` newest (the active one and the one a rollback would
return to, by default).

Everything here runs on the event loop's thread: no locks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fleetmind.client.versions import CURRENT, current_version
from fleetmind.runtime.layout import VERSIONS


@dataclass(frozen=True)
class Served:
    """What one request is served by: a site version (None: the base model, before the
    first activation), the adapter's name where it is loaded, and its folder."""

    version: int | None
    adapter: str | None
    folder: Path | None


class ActiveVersions:
    """The site's active version and the adapters loaded for it and its predecessors."""

    def __init__(self, site_dir: Path | None, keep: int, name: Callable[[int], str]) -> None:
        if keep < 1:
            raise ValueError(f"keep={keep}: keep at least the active adapter loaded")
        self.site_dir = None if site_dir is None else Path(site_dir)
        self.keep = keep
        self._name = name
        self._loaded: list[str] = []  # load order, oldest first
        self._pins: Counter[str] = Counter()

    def current(self) -> Served:
        """The version a request arriving now gets."""
        if self.site_dir is None or not (self.site_dir / CURRENT).exists():
            return Served(None, None, None)
        number = current_version(self.site_dir)
        if number is None:
            return Served(None, None, None)
        return Served(number, self._name(number), self.site_dir / VERSIONS / f"{number:08d}")

    @contextmanager
    def pin(self, served: Served) -> Iterator[Served]:
        """Holds `served`'s adapter loaded while the block runs (a request in flight)."""
        if served.adapter is None:
            yield served
            return
        self._pins[served.adapter] += 1
        try:
            yield served
        finally:
            self._pins[served.adapter] -= 1
            if not self._pins[served.adapter]:
                del self._pins[served.adapter]

    def is_loaded(self, adapter: str) -> bool:
        return adapter in self._loaded

    def loaded(self, adapter: str) -> None:
        """Records that `adapter` was loaded (it becomes the newest)."""
        if adapter in self._loaded:
            self._loaded.remove(adapter)
        self._loaded.append(adapter)

    def unloaded(self, adapter: str) -> None:
        if adapter in self._loaded:
            self._loaded.remove(adapter)

    def superseded(self) -> list[str]:
        """Loaded adapters beyond the `keep` newest that no request in flight uses: what may
        be unloaded now. The active one is never among them."""
        active = self.current().adapter
        old = self._loaded[:-self.keep] if len(self._loaded) > self.keep else []
        return [name for name in old if name != active and not self._pins[name]]

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self._loaded)

    def in_use(self, adapter: str) -> int:
        return self._pins[adapter]
