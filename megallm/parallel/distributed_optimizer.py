"""Mixed-precision data parallelism and AdamW over flat buffers, Megatron's way.

Per model chunk, two flat buffers of the same layout, padded to a multiple of dp elements:

    param buffer  (params dtype: bf16 or fp32)   every parameter's .data is a view of it
    grad buffer   (fp32)                          every parameter's .main_grad is a view of it

Backward accumulates each micro-batch's gradient into .main_grad in fp32 (a post-accumulate-grad
hook adds p.grad and drops it), so bf16 gradients are never summed in bf16. Then, over the
data-parallel group:

    without --use-distributed-optimizer: all-reduce the grad buffer (average); every rank steps
        every parameter.
    with it: reduce-scatter, so data-parallel rank r holds the averaged fp32 gradient of elements
        [r * N/dp, (r + 1) * N/dp) of the buffer (its share); it keeps fp32 masters and Adam moments
        for that share only, steps them, writes them into its share of the param buffer and
        all-gathers the param buffer.

The optimizer itself is torch's AdamW, run over views of the share cut at parameter boundaries
(one piece per parameter, so 1-D norm weights keep weight decay 0). With foreach=False (CPU) the
update is elementwise and therefore bitwise independent of how the buffer is cut: any layout
steps each element exactly as one process does. In fp32 the masters are the param buffer's own
views (no copy); in bf16 they are fp32 copies, and the bf16 weights are refreshed from them after
each step. A skipped step touches nothing.

Overlap of the reduce-scatter with backward and of the all-gather with the next forward
(Megatron's --overlap-grad-reduce / --overlap-param-gather) is not implemented: the collectives run
once per iteration, after backward and after the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from megallm.parallel import data_parallel as dp_utils
from megallm.training.optimizer_state import OptimizerShard


def _ps():
    from megatron.core import parallel_state

    return parallel_state


def _accumulate_main_grad(p: torch.Tensor) -> None:
    p.main_grad.add_(p.grad)
    p.grad = None


class ChunkBuffers:
    """One model chunk's parameters and fp32 main grads, as two flat buffers of the same layout."""

    def __init__(self, params: list[nn.Parameter], dp_size: int):
        numel = sum(p.numel() for p in params)
        self.numel = numel
        self.padded = math.ceil(max(numel, 1) / dp_size) * dp_size
        self.shard_size = self.padded // dp_size
        dtype, device = params[0].dtype, params[0].device
        self.params = torch.zeros(self.padded, dtype=dtype, device=device)
        self.grads = torch.zeros(self.padded, dtype=torch.float32, device=device)
        self.index: list[tuple[nn.Parameter, int, int]] = []  # (param, start, end) in the buffers
        offset = 0
        for p in params:
            end = offset + p.numel()
            self.params[offset:end].copy_(p.detach().reshape(-1))
            p.data = self.params[offset:end].view_as(p)
            p.main_grad = self.grads[offset:end].view_as(p)
            self.index.append((p, offset, end))
            offset = end

    def share(self, dp_rank: int) -> tuple[int, int]:
        return dp_rank * self.shard_size, (dp_rank + 1) * self.shard_size


class Piece(NamedTuple):
    """The part [start, end) of a parameter (flattened) that this rank steps."""
    param: nn.Parameter
    start: int
    end: int
    model: torch.Tensor  # view of the param buffer
    grad: torch.Tensor  # view of the fp32 grad buffer
    master: torch.Tensor  # fp32: the model view itself; bf16: an fp32 copy


class DistributedOptimizer:
    """AdamW with fp32 main grads and (optionally) ZeRO-1 sharded fp32 masters and moments.

    The training loop's sequence per iteration:
        zero_grad() -> forward/backward -> reduce_gradients(divisor) -> grad_norm()
        -> clip_(max_norm, norm) + step(), or nothing on a skipped iteration
    """

    def __init__(self, chunks: list[nn.Module], distributed: bool, foreach: bool, **adam_kwargs):
        ps = _ps()
        self.group = ps.get_data_parallel_group()
        self.dp_size, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.distributed = distributed and self.dp_size > 1
        self.buffers: list[ChunkBuffers] = []
        self.pieces: list[Piece] = []
        for chunk in chunks:
            params = [p for p in chunk.parameters() if p.requires_grad]
            buf = ChunkBuffers(params, self.dp_size)
            self.buffers.append(buf)
            lo, hi = buf.share(self.dp_rank) if self.distributed else (0, buf.padded)
            for p, a, b in buf.index:
                start, end = max(a, lo), min(b, hi)
                if start >= end:
                    continue
                model, grad = buf.params[start:end], buf.grads[start:end]
                master = model if model.dtype == torch.float32 else model.float()  # .float() copies bf16
                master.grad = grad
                self.pieces.append(Piece(p, start - a, end - a, model, grad, master))
            for p in params:
                p.register_post_accumulate_grad_hook(_accumulate_main_grad)
        groups = [{"params": [x.master for x in self.pieces if x.param.ndim >= 2], "wd_mult": 1.0},
                  {"params": [x.master for x in self.pieces if x.param.ndim < 2], "wd_mult": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, foreach=foreach, **adam_kwargs)
        # decided by dtype, not by this rank's pieces: a rank whose share is all padding holds none,
        # and the checkpoint's collectives need the same answer on every rank
        self.main_params_are_copies = self.buffers[0].params.dtype != torch.float32
        self.steps = 0  # optimizer steps taken, equal on every rank (a rank may hold no piece)

    # -- what the scheduler and the checkpoint see ------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def state(self) -> dict:
        """Adam's state per master piece (empty until the first step or a load)."""
        return self.optimizer.state

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for buf in self.buffers for p, _, _ in buf.index]

    # -- one iteration --------------------------------------------------------------------------
    def zero_grad(self) -> None:
        for buf in self.buffers:
            buf.grads.zero_()
            for p, _, _ in buf.index:
                p.grad = None

    def reduce_gradients(self, microbatch_divisor: int = 1) -> None:
        """Finish the fp32 main grads: fold in gradients that bypassed the hook (the zero-bubble
        schedules write weight gradients to p.grad directly), divide by the micro-batches the
        loss was not divided by, and average over data parallel."""
        for buf in self.buffers:
            for p, _, _ in buf.index:
                if p.grad is not None:
                    p.main_grad.add_(p.grad)
                    p.grad = None
            if microbatch_divisor != 1:
                buf.grads.div_(microbatch_divisor)
            if self.dp_size == 1:
                continue
            buf.grads.div_(self.dp_size)
            if self.distributed:
                lo, hi = buf.share(self.dp_rank)
                dist.reduce_scatter_single(buf.grads[lo:hi], buf.grads, group=self.group)
            else:
                dist.all_reduce(buf.grads, group=self.group)

    def grad_norm(self) -> tuple[torch.Tensor, bool]:
        """Global L2 norm of the reduced gradient, and whether any rank holds a non-finite one.
        Sharded, each rank sums its own share and the sum runs over the whole world; the NaN/Inf
        flag also looks at the rest of the local buffer (this rank's own gradient before the
        reduce-scatter), so a non-finite local gradient anywhere makes every rank skip."""
        pieces = [(x.grad, dp_utils.is_tensor_parallel_unique(x.param)) for x in self.pieces]
        if not self.distributed:
            return dp_utils.global_grad_norm(pieces, _ps().get_model_parallel_group())
        local = [(buf.grads, False) for buf in self.buffers]
        return dp_utils.global_grad_norm(pieces, None, extra_finite_check=local)

    def clip_(self, max_norm: float, total_norm: float) -> None:
        dp_utils.clip_grads_([x.grad for x in self.pieces], max_norm, total_norm)

    @torch.no_grad()
    def step(self) -> None:
        self.optimizer.step()
        self.steps += 1
        if self.main_params_are_copies:
            for x in self.pieces:
                x.model.copy_(x.master)
        if self.distributed:
            for buf in self.buffers:
                lo, hi = buf.share(self.dp_rank)
                dist.all_gather_single(buf.params, buf.params[lo:hi], group=self.group)

    # -- checkpoint contract (megallm.training.optimizer_state) ----------------------------------
    def sharded_state(self) -> tuple[list[OptimizerShard], dict]:
        """This rank's ranges, disjoint over data parallel. Without the distributed optimizer every
        data-parallel rank holds everything, and reports the d-th of dp contiguous cuts of each
        piece, so the replicas share the checkpoint writing evenly."""
        shards = []
        for x in self.pieces:
            state = self.optimizer.state.get(x.master, {})
            tensors = {k: state[k] for k in ("exp_avg", "exp_avg_sq") if k in state}
            if self.main_params_are_copies:
                tensors["main_param"] = x.master
            start, end = x.start, x.end
            if not self.distributed:
                n = end - start
                start = x.start + n * self.dp_rank // self.dp_size
                end = x.start + n * (self.dp_rank + 1) // self.dp_size
                tensors = {k: t.view(-1)[start - x.start:end - x.start] for k, t in tensors.items()}
            shards.append(OptimizerShard(x.param, start, end, tensors))
        return shards, self._scalars()

    def _scalars(self) -> dict:
        return {"step": self.steps}

    @torch.no_grad()
    def load_sharded_state(self, read: Callable[[nn.Parameter, int, int, str], torch.Tensor],
                           scalars: dict) -> None:
        """read(param, start, end, key) -> fp32 values; "main_param" is read when the masters are
        copies (bf16), and the bf16 weights are refreshed from them."""
        self.steps = int(scalars.get("step", 0))
        step = float(self.steps)
        self.optimizer.state.clear()
        for x in self.pieces:
            if step > 0:
                self.optimizer.state[x.master] = {
                    "step": torch.tensor(step, dtype=torch.float32),
                    "exp_avg": read(x.param, x.start, x.end, "exp_avg").to(x.master).clone(),
                    "exp_avg_sq": read(x.param, x.start, x.end, "exp_avg_sq").to(x.master).clone(),
                }
            if self.main_params_are_copies:
                x.master.copy_(read(x.param, x.start, x.end, "main_param"))
                x.model.copy_(x.master)

    @torch.no_grad()
    def reload_masters_from_params(self) -> None:
        """After weights were written into the parameters directly (model-only checkpoints)."""
        for x in self.pieces:
            if x.master is not x.model:
                x.master.copy_(x.model)

    # -- for tests and the memory measurement -----------------------------------------------------
    def state_tensors(self) -> list[torch.Tensor]:
        return [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]

    def master_tensors(self) -> list[torch.Tensor]:
        return [x.master for x in self.pieces if x.master is not x.model]

