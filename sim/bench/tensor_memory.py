"""Peak memory of the tensors a block of CPU work allocates, counted as ops run.

The CPU has no `torch.cuda.max_memory_allocated`; torch.profiler's memory events give the
same number but keep a record of every allocation, which at real shapes outgrows the
machine (docs/real-shapes.md). This keeps one entry per live storage instead.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """Inside `with LiveTensorBytes() as meter:`, an op's output on a storage none of its
    inputs hold is a new allocation, counted until the storage is freed (a weak reference's
    callback: torch keeps one Python object per storage while it lives); `meter.peak` is the
    most bytes live at once. Storages from before the block are never counted, nor tensors
    made from Python data without an op (a few scalars: bytes, not megabytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._held: dict[int, weakref.ref[Any]] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        if self._held.pop(key, None) is not None:
            self.live -= nbytes

    def _count(self, storage: Any) -> None:
        key, nbytes = id(storage), int(storage.nbytes())

        def freed(_: object) -> None:
            self._freed(key, nbytes)

        self._held[key] = weakref.ref(storage, freed)
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                continue
            storage = tensor.untyped_storage()
            if id(storage) not in inputs and id(storage) not in self._held:
                self._count(storage)  # not a view or an in-place result: allocated here
        return out
