"""The sample stream: which dataset samples each iteration, data-parallel rank and micro-batch read.

The stream is Megatron's MegatronPretrainingSampler order: stream positions are read in order,
and the global batch of an iteration is positions [consumed, consumed + global_batch_size). Within
it, micro-batch m of data-parallel rank r is positions

    consumed + (m * dp_size + r) * micro_batch_size + [0, micro_batch_size)

(micro-batch-major, then rank), so the union over ranks and micro-batches is exactly the global
batch, the same for any tp/pp, and a run that restarts at `consumed_samples` (kept in the
checkpoint) reads exactly what an uninterrupted run would have read next. The datasets shuffle
internally (megatron's GPTDataset/BlendedDataset), so reading positions in order is not reading
documents in order.

Exclusion list (`--exclude-samples FILE`, written by `tools/spike_report.py --skip-list`): dataset
sample indices never to train on. Stream position p reads the p-th dataset index that is not
excluded, so excluded samples are stepped over and the batch still fills up. Adding indices past
what a checkpoint has consumed (the usual rollback-and-skip) leaves its past stream unchanged;
resuming at that checkpoint then differs only where the excluded samples would have been read.

File format: one dataset sample index a line; `#` starts a comment; blank lines are ignored. A
JSON list of integers is accepted as well.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch


class ExcludeListError(ValueError):
    pass


def load_exclude_samples(path: str | Path) -> set[int]:
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ExcludeListError(f"{path}: not a valid JSON list ({e.msg} at line {e.lineno})") from None
        if not all(isinstance(v, int) and v >= 0 for v in values):
            raise ExcludeListError(f"{path}: the JSON list must hold non-negative integers")
        return set(values)
    samples = set()
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if not entry.isdigit():
            raise ExcludeListError(f"{path}:{number}: expected a sample index (non-negative integer), got {entry!r}")
        samples.add(int(entry))
    return samples


def _sorted_exclude(exclude) -> np.ndarray:
    if exclude is None:
        return np.empty(0, dtype=np.int64)
    return np.unique(np.asarray(list(exclude) if isinstance(exclude, (set, frozenset)) else exclude, dtype=np.int64))


def stream_to_dataset_index(positions: np.ndarray, exclude=None) -> np.ndarray:
    """The p-th dataset index not in `exclude`, for each stream position p.

    With E the sorted excluded indices, the answer is p + #{j : E[j] - j <= p}: E[j] - j counts
    the kept indices below E[j], so each excluded index at or before the answer shifts it by one."""
    positions = np.asarray(positions, dtype=np.int64)
    excluded = _sorted_exclude(exclude)
    if not len(excluded):
        return positions
    kept_below = excluded - np.arange(len(excluded))
    return positions + np.searchsorted(kept_below, positions, side="right")


def global_batch_indices(consumed_samples: int, global_batch_size: int, exclude=None) -> np.ndarray:
    """Dataset indices of the whole global batch that starts at stream position consumed_samples."""
    return stream_to_dataset_index(consumed_samples + np.arange(global_batch_size), exclude)


def micro_batch_indices(consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                        micro_batch_index: int, exclude=None) -> np.ndarray:
    """Dataset indices of one micro-batch of one data-parallel rank (order in the module docstring)."""
    assert 0 <= dp_rank < dp_size, f"dp_rank {dp_rank} outside [0, {dp_size})"
    start = consumed_samples + (micro_batch_index * dp_size + dp_rank) * micro_batch_size
    return stream_to_dataset_index(start + np.arange(micro_batch_size), exclude)


def get_micro_batch(dataset, indices: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels), LongTensor[len(indices), seq_length] each."""
    items = [dataset[int(i)] for i in indices]
    tokens = torch.stack([torch.as_tensor(item["tokens"], dtype=torch.long) for item in items])
    labels = torch.stack([torch.as_tensor(item["labels"], dtype=torch.long) for item in items])
    return tokens, labels
