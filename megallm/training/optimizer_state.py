"""The contract between an optimizer and the checkpoint: optimizer state as flat ranges of the
parameters this rank holds, so that each rank saves and loads only its own share.

A parameter here is the local tensor a rank holds (its tensor-parallel shard), seen flattened.
Under a distributed optimizer (ZeRO-1) a data-parallel rank owns a contiguous range of each
parameter, or none of it; without one, every data-parallel rank holds everything.

    optimizer.sharded_state() -> (shards, scalars)
        shards: list[OptimizerShard], the ranges this rank writes. Across the data-parallel group
        they are disjoint and together cover every local parameter exactly once.
        scalars: {"step": int, ...} equal on every rank.
    optimizer.load_sharded_state(read, scalars)
        read(param, start, end, key) -> 1-D fp32 tensor of end - start values; the optimizer calls
        it for every range whose state this rank holds.
    optimizer.reload_masters_from_params()
        the weights were written into the parameters directly (every load does this first, and a
        model-only checkpoint stops there): fp32 masters, where kept, are set from them.
    optimizer.finish_param_sync()
        waits for weight all-gathers still in flight (--overlap-param-gather); save and load call it
        before they read or write the weights.

Keys of `OptimizerShard.tensors`: "exp_avg", "exp_avg_sq" (Adam moments) and "main_param" (the
fp32 master copy) when the model's parameters are kept in a lower precision.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class OptimizerShard(NamedTuple):
    param: torch.nn.Parameter
    start: int  # element offsets into param.view(-1)
    end: int
    tensors: dict[str, torch.Tensor]  # key -> 1-D fp32 tensor of end - start elements
