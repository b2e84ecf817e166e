"""Blends: Megatron's --data-path syntax, and changing the blend when a run resumes.

A run that resumes with the --data-path it was saved with reads exactly the stream it would have
read (megatron's blend is rebuilt from the same seed and sizes). A run that resumes with another
--data-path (data added mid-run, weights changed) continues as follows:
  - stream positions before the checkpoint's consumed_samples are history and are never read again;
  - each dataset continues after the samples it has already given (counted per dataset prefix in
    the checkpoint's data state, excluded samples included), so nothing already consumed is
    replayed, and a new dataset starts at its beginning;
  - from there the new weights hold, blended the way megatron blends (greedy, within one sample).
Megatron orders a dataset's samples by one shuffle per build; "continues after" is exact while the
dataset is within its first epoch, as in most pretraining. A dataset read beyond one epoch is
reshuffled as a whole, as it would be in any multi-epoch megatron run, and may repeat documents.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np


class DataConfigError(ValueError):
    pass


def parse_blend(data_path: list[str]) -> tuple[list[str], Optional[list[float]]]:
    """Megatron's --data-path: [PREFIX ...] or [W1, PREFIX1, W2, PREFIX2, ...] -> (prefixes, weights).
    Raises DataConfigError naming the flag and the expected form."""
    if not data_path:
        return [], None

    def number(s: str) -> Optional[float]:
        try:
            return float(s)
        except ValueError:
            return None

    given = f"--data-path {' '.join(data_path)}"
    form = "give PREFIX ... or W1 PREFIX1 W2 PREFIX2 ... (weights before their prefixes)"
    if number(data_path[0]) is None:
        if any(number(s) is not None for s in data_path):
            raise DataConfigError(f"{given}: a weight among prefixes; {form}")
        return list(data_path), None
    if len(data_path) % 2:
        raise DataConfigError(f"{given}: {len(data_path)} values, not weight/prefix pairs; {form}")
    for weight, prefix in zip(data_path[0::2], data_path[1::2]):
        w = number(weight)
        if w is None or not math.isfinite(w) or w <= 0 or number(prefix) is not None:
            raise DataConfigError(f"{given}: '{weight} {prefix}' is not a positive weight followed by a prefix; "
                                  f"{form}")
    return list(data_path[1::2]), [float(w) for w in data_path[0::2]]


def dataset_key(prefix: str) -> str:
    """A prefix as the checkpoint's data state names it: the same files however the path is written."""
    return os.path.realpath(prefix)


def _segments(train_ds):
    """(mid-level datasets, dataset_index, dataset_sample_index, first index, per-dataset offsets)."""
    if isinstance(train_ds, ContinuedBlend):
        t = train_ds
        return t.datasets, t.dataset_index, t.dataset_sample_index, t.start, t.offsets
    if hasattr(train_ds, "dataset_index"):  # megatron's BlendedDataset
        return train_ds.datasets, train_ds.dataset_index, train_ds.dataset_sample_index, 0, [0] * len(train_ds.datasets)
    return [train_ds], None, None, 0, [0]


def data_state(train_ds, data_path: list[str], consumed_samples: int, exclude=None) -> dict:
    """What a checkpoint keeps so that a resume with another blend replays nothing: {"data_path",
    "consumed_samples", "next_sample": the dataset index the stream reads next (past exclusions),
    "consumed_per_dataset": {prefix: samples read or stepped over}}."""
    from megallm.data.sampler import stream_to_dataset_index

    end = int(stream_to_dataset_index([consumed_samples], exclude)[0])  # first dataset index not yet read
    datasets, dataset_index, _, start, offsets = _segments(train_ds)
    if dataset_index is None:
        counts = [end]
    else:
        counts = np.bincount(np.asarray(dataset_index[:max(end - start, 0)]), minlength=len(datasets))
    consumed = dict(getattr(train_ds, "earlier", {}))  # datasets dropped from the blend before
    for ds, offset, count in zip(datasets, offsets, counts):
        consumed[dataset_key(ds.dataset_path)] = int(offset) + int(count)
    return {"data_path": list(data_path), "consumed_samples": int(consumed_samples), "next_sample": end,
            "consumed_per_dataset": consumed}


class ContinuedBlend:
    """The train stream after a change of blend at dataset index `start`: index i >= start reads
    sample offsets[d] + k of dataset d, where (d, k) is megatron's blending of the new weights at
    i - start. Same item interface as megatron's BlendedDataset (plus `dataset_id`)."""

    def __init__(self, datasets: list, weights: list[float], size: int, start: int, offsets: list[int],
                 earlier: Optional[dict] = None):
        from megatron.core.datasets import helpers

        self.datasets, self.start, self.offsets = datasets, start, list(offsets)
        self.earlier = dict(earlier or {})
        weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.dataset_index = np.zeros(size, dtype=np.int16)
        self.dataset_sample_index = np.zeros(size, dtype=np.int64)
        helpers.build_blending_indices(self.dataset_index, self.dataset_sample_index, weights, len(datasets), size,
                                       False)
        self.dataset_sample_index += np.asarray(self.offsets, dtype=np.int64)[self.dataset_index]
        for d, ds in enumerate(datasets):
            need = int(self.dataset_sample_index[self.dataset_index == d].max(initial=-1)) + 1
            assert need <= len(ds), f"{ds.dataset_path}: blend needs {need} samples, built {len(ds)}"

    def __len__(self) -> int:
        return self.start + len(self.dataset_index)

    def _position(self, idx: int) -> int:
        if not self.start <= idx < len(self):
            raise IndexError(f"sample {idx}: the blend changed at sample {self.start}; "
                             f"earlier samples belong to the previous blend and are not read again")
        return idx - self.start

    def locate(self, idx: int) -> tuple[object, int]:
        """(mid-level dataset, its sample index) behind sample idx."""
        j = self._position(int(idx))
        return self.datasets[int(self.dataset_index[j])], int(self.dataset_sample_index[j])

    def __getitem__(self, idx: int) -> dict:
        j = self._position(int(idx))
        d = int(self.dataset_index[j])
        return {"dataset_id": d, **self.datasets[d][int(self.dataset_sample_index[j])]}
