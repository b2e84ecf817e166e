"""The sharded-state contract (megallm/training/optimizer_state.py) for today's torch optimizers.

Used only when the optimizer has no `sharded_state` of its own (megallm's distributed optimizer
implements the contract itself; this adapter goes once every optimizer does).

    torch AdamW (every data-parallel rank holds every moment): each parameter is cut into dp
        contiguous ranges and data-parallel rank d writes range d, so the ranks of a replica share
        the writing evenly; on load every rank reads every range.
    ZeroRedundancyOptimizer (whole parameters partitioned over data parallel): the rank that owns a
        parameter writes its whole range and loads it back.
"""

from __future__ import annotations

import torch

from megallm.training.optimizer_state import OptimizerShard

MOMENTS = ("exp_avg", "exp_avg_sq")


def _zero_class():
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer


class TorchOptimizerState:
    def __init__(self, optimizer: torch.optim.Optimizer, dp_rank: int, dp_size: int):
        self.optimizer, self.dp_rank, self.dp_size = optimizer, dp_rank, dp_size
        self.zero = isinstance(optimizer, _zero_class())
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def _owned(self) -> list[tuple[torch.nn.Parameter, int, int]]:
        if self.zero:
            owner = self.optimizer._param_to_rank
            return [(p, 0, p.numel()) for p in self.params if owner[p] == self.dp_rank]
        d, n = self.dp_rank, self.dp_size
        return [(p, p.numel() * d // n, p.numel() * (d + 1) // n) for p in self.params]

    def _state(self, p) -> dict:
        states = self.optimizer.optim.state if self.zero else self.optimizer.state
        return states.get(p, {})

    def sharded_state(self) -> tuple[list[OptimizerShard], dict]:
        shards, step = [], None
        for p, start, end in self._owned():
            state = self._state(p)
            tensors = {k: state[k].detach().reshape(-1)[start:end] for k in MOMENTS if k in state}
            if "step" in state:
                step = float(state["step"])
            shards.append(OptimizerShard(p, start, end, tensors))
        return shards, {"step": step}

    def load_sharded_state(self, read, scalars: dict) -> None:
        states = self.optimizer.optim.state if self.zero else self.optimizer.state
        for p, _, _ in (self._owned() if self.zero else [(p, 0, p.numel()) for p in self.params]):
            if scalars.get("step") is None:
                states.pop(p, None)  # saved before the first step: no moments yet
                continue
            states[p] = {"step": torch.tensor(float(scalars["step"]), dtype=torch.float32),
                         **{k: read(p, 0, p.numel(), k).view_as(p).to(p.device).clone() for k in MOMENTS}}


def sharded_state_of(optimizer, dp_rank: int, dp_size: int):
    """The optimizer itself when it speaks the contract, else the adapter."""
    if hasattr(optimizer, "sharded_state") and hasattr(optimizer, "load_sharded_state"):
        return optimizer
    return TorchOptimizerState(optimizer, dp_rank, dp_size)
