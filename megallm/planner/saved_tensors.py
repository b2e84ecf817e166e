"""What autograd really keeps for backward, to set beside the planner's activation count
(megallm.planner.memory): used by the measured-memory test and by bench/gpu.py."""

from __future__ import annotations

import torch


class SavedTensorMeter:
    """Live and peak bytes of the distinct storages autograd has saved for backward (parameters and
    buffers excluded by their storage pointers)."""

    def __init__(self, exclude: set[int]):
        self.exclude, self.live, self.current, self.peak = exclude, {}, 0, 0

    def _release(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[ptr]

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in self.exclude:
            return t
        entry = self.live.setdefault(ptr, [storage.nbytes(), 0])
        entry[1] += 1
        if entry[1] == 1:
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        return _Held(t, self, ptr)

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Held:
    __slots__ = ("tensor", "meter", "ptr")

    def __init__(self, tensor, meter, ptr):
        self.tensor, self.meter, self.ptr = tensor, meter, ptr

    def __del__(self):
        self.meter._release(self.ptr)
