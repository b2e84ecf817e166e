"""Mixed-precision data parallelism and AdamW over flat buffers, Megatron's way.

Per model chunk, two flat buffers of the same layout, padded to a multiple of dp elements:

    param buffer  (params dtype: bf16 or fp32)   every parameter's .data is a view of it
    grad buffer   (fp32)                          every parameter's .main_grad is a view of it

With --ddp-bucket-size each chunk's parameters are cut into buckets (Megatron's), and each bucket
is such a pair of buffers, padded and sharded over dp on its own; below, "buffer" is a bucket.

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

--overlap-grad-reduce (Megatron's): the hook also counts each parameter's gradients; once every
parameter of a bucket has all its micro-batches', the hook divides the bucket and starts its
reduction asynchronously, so it runs during the rest of backward; reduce_gradients() waits for
them. Buckets start in one fixed order (launch_order), the same on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn

from megallm.parallel import data_parallel as dp_utils
from megallm.training.optimizer_state import OptimizerShard


def _ps():
    from megatron.core import parallel_state

    return parallel_state


def fold_into_main_grad(p: nn.Parameter) -> None:
    """Add p.grad (one micro-batch's, in the parameter's dtype) to the fp32 main grad and drop it,
    so micro-batches are summed in fp32 whatever the parameters' precision."""
    p.main_grad.add_(p.grad)
    p.grad = None


def default_bucket_size(dp_size: int) -> int:
    """Megatron's bucket size when overlapping and --ddp-bucket-size is unset (elements)."""
    return max(40_000_000, 1_000_000 * dp_size)


def split_into_buckets(params: list[nn.Parameter], bucket_size: Optional[int]) -> list[list[nn.Parameter]]:
    """Megatron's bucketing: parameters taken in backward order (the last layer's first, the order
    their gradients complete in), a bucket closed once it holds bucket_size elements or more, so no
    parameter straddles two. Buckets come in that backward order; each lists its parameters in
    forward order, so that one bucket (bucket_size None) is laid out as the chunk itself."""
    if bucket_size is None:
        return [params]
    buckets, current, numel = [], [], 0
    for p in reversed(params):
        current.append(p)
        numel += p.numel()
        if numel >= bucket_size:
            buckets.append(current[::-1])
            current, numel = [], 0
    if current:
        buckets.append(current[::-1])
    return buckets


class Bucket:
    """Some of a model chunk's parameters (all of them without bucketing) and their fp32 main grads,
    as two flat buffers of the same layout, padded to a multiple of dp and sharded over dp on their
    own. The per-iteration fields serve --overlap-grad-reduce and --overlap-param-gather."""

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
        self.waiting = len(self.index)  # parameters still to receive their last micro-batch's gradient
        self.launched = False  # reduction started (from the backward hook, or by reduce_gradients)
        self.work = None  # the async reduction's handle until waited for
        self.gather = None  # the async all-gather of the weights (--overlap-param-gather) until waited for

    def share(self, dp_rank: int) -> tuple[int, int]:
        return dp_rank * self.shard_size, (dp_rank + 1) * self.shard_size

    def reset(self) -> None:
        self.grads.zero_()
        for p, _, _ in self.index:
            p.grad = None
        self.waiting, self.launched, self.work = len(self.index), False, None


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

    bucket_size: elements per bucket (None: one bucket per chunk). overlap_grad_reduce: launch each
    bucket's reduction from the backward hook once all its parameters have had `microbatches`
    gradients accumulated, divided by `microbatch_divisor` (what reduce_gradients will be given).
    overlap_param_gather: step() leaves the all-gathers running; a chunk's forward waits for its own,
    anything else that touches the weights calls finish_param_sync() first.
    """

    def __init__(self, chunks: list[nn.Module], distributed: bool, foreach: bool, bucket_size: Optional[int] = None,
                 overlap_grad_reduce: bool = False, microbatches: int = 1, microbatch_divisor: int = 1,
                 overlap_param_gather: bool = False, **adam_kwargs):
        ps = _ps()
        self.group = ps.get_data_parallel_group()
        self.dp_size, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.distributed = distributed and self.dp_size > 1
        if overlap_grad_reduce and bucket_size is None:
            bucket_size = default_bucket_size(self.dp_size)
        self.buckets: list[Bucket] = []  # chunk by chunk, each chunk's in backward order
        self.pieces: list[Piece] = []
        chunk_buckets = []
        for chunk in chunks:
            params = [p for p in chunk.parameters() if p.requires_grad]
            chunk_buckets.append([Bucket(members, self.dp_size) for members in split_into_buckets(params, bucket_size)])
            for bucket in chunk_buckets[-1]:
                self.buckets.append(bucket)
                self._cut_pieces(bucket)
            for p in params:
                p.register_post_accumulate_grad_hook(self._accumulate_main_grad)
        # Overlapped reductions start in this order and no other, so every data-parallel rank issues
        # the same collectives in the same order whatever the timing of its hooks: the order in which
        # backward completes buckets (a pipeline rank's later chunks finish their last backward first).
        self.launch_order = [b for buckets in reversed(chunk_buckets) for b in buckets]
        # the weights' all-gathers in the order the next forward needs them
        self.gather_order = [b for buckets in chunk_buckets for b in reversed(buckets)]
        self.overlap_param_gather = overlap_param_gather and self.distributed
        if self.overlap_param_gather:
            for chunk, buckets in zip(chunks, chunk_buckets):
                chunk.register_forward_pre_hook(lambda _module, _args, b=buckets: self._finish_gathers(b))
        self.next_launch = 0
        self.overlap_grad_reduce = overlap_grad_reduce and self.dp_size > 1  # nothing to overlap at dp 1
        self.microbatches, self.microbatch_divisor = microbatches, microbatch_divisor
        self.bucket_of = {p: b for b in self.buckets for p, _, _ in b.index}
        self.accumulations: dict[nn.Parameter, int] = {}  # this iteration's, per parameter, when overlapping
        self.launched_in_backward = 0  # buckets the last backward launched itself (for tests and logs)
        groups = [{"params": [x.master for x in self.pieces if x.param.ndim >= 2], "wd_mult": 1.0},
                  {"params": [x.master for x in self.pieces if x.param.ndim < 2], "wd_mult": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, foreach=foreach, **adam_kwargs)
        # decided by dtype, not by this rank's pieces: a rank whose share is all padding holds none,
        # and the checkpoint's collectives need the same answer on every rank
        self.main_params_are_copies = self.buckets[0].params.dtype != torch.float32
        self.steps = 0  # optimizer steps taken, equal on every rank (a rank may hold no piece)

    def _cut_pieces(self, bucket: Bucket) -> None:
        """This rank's pieces of a bucket: its share (sharded) or all of it, cut at parameter boundaries."""
        lo, hi = bucket.share(self.dp_rank) if self.distributed else (0, bucket.padded)
        for p, a, b in bucket.index:
            start, end = max(a, lo), min(b, hi)
            if start >= end:
                continue
            model, grad = bucket.params[start:end], bucket.grads[start:end]
            master = model if model.dtype == torch.float32 else model.float()  # .float() copies bf16
            master.grad = grad
            self.pieces.append(Piece(p, start - a, end - a, model, grad, master))

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
        return [p for bucket in self.buckets for p, _, _ in bucket.index]

    # -- one iteration --------------------------------------------------------------------------
    def zero_grad(self) -> None:
        if any(b.work is not None for b in self.buckets):
            raise RuntimeError("zero_grad with a gradient reduction in flight: reduce_gradients() was not called")
        for bucket in self.buckets:
            bucket.reset()
        self.next_launch, self.launched_in_backward = 0, 0
        self.accumulations.clear()

    def _accumulate_main_grad(self, p: nn.Parameter) -> None:
        """Post-accumulate-grad hook: sum each micro-batch's gradient into the fp32 main grad."""
        fold_into_main_grad(p)
        if self.overlap_grad_reduce:
            self._count_accumulation(p)

    def _count_accumulation(self, p: nn.Parameter) -> None:
        n = self.accumulations.get(p, 0) + 1
        self.accumulations[p] = n
        if n > self.microbatches:  # its bucket may already be reducing: the sum would be wrong
            raise RuntimeError(f"overlap_grad_reduce: a parameter of shape {tuple(p.shape)} received {n} gradients "
                               f"in one iteration, more than its {self.microbatches} micro-batches")
        if n < self.microbatches:
            return
        self.bucket_of[p].waiting -= 1
        while self.next_launch < len(self.launch_order) and self.launch_order[self.next_launch].waiting == 0:
            self._launch(self.launch_order[self.next_launch], self.microbatch_divisor, async_op=True)
            self.next_launch += 1
            self.launched_in_backward += 1

    def _launch(self, bucket: Bucket, microbatch_divisor: int, async_op: bool) -> None:
        """Divide a bucket's main grads (micro-batches, then dp) and start its data-parallel
        reduction; the same operations in the same order whether from the hook or after backward,
        so overlapping changes no bit."""
        bucket.launched = True
        if microbatch_divisor != 1:
            bucket.grads.div_(microbatch_divisor)
        if self.dp_size == 1:
            return
        bucket.grads.div_(self.dp_size)
        if self.distributed:
            lo, hi = bucket.share(self.dp_rank)
            bucket.work = dist.reduce_scatter_single(bucket.grads[lo:hi], bucket.grads, group=self.group,
                                                     async_op=async_op)
        else:
            bucket.work = dist.all_reduce(bucket.grads, group=self.group, async_op=async_op)

    def reduce_gradients(self, microbatch_divisor: int = 1) -> None:
        """Finish the fp32 main grads: fold in any gradient left in p.grad outside the hook (the
        pipeline stages fold the zero-bubble weight pass's themselves, micro-batch by micro-batch,
        so the schedules leave none), divide by the micro-batches the
        loss was not divided by, and average over data parallel. Buckets the backward hook already
        launched (--overlap-grad-reduce) are only waited for."""
        if self.overlap_grad_reduce and microbatch_divisor != self.microbatch_divisor:
            raise ValueError(f"reduce_gradients({microbatch_divisor}): the overlapped reductions divided by "
                             f"{self.microbatch_divisor}")
        for bucket in self.launch_order:
            strays = [p for p, _, _ in bucket.index if p.grad is not None]
            if bucket.launched and strays:
                raise RuntimeError("overlap_grad_reduce: a gradient arrived outside the hook after its bucket's "
                                   "reduction started")
            if bucket.launched:
                continue
            for p in strays:
                fold_into_main_grad(p)
            self._launch(bucket, microbatch_divisor, async_op=False)
        for bucket in self.launch_order:
            if bucket.work is not None:
                bucket.work.wait()
                bucket.work = None

    def grad_norm(self) -> tuple[torch.Tensor, bool]:
        """Global L2 norm of the reduced gradient, and whether any rank holds a non-finite one.
        Sharded, each rank sums its own share and the sum runs over the whole world; the NaN/Inf
        flag also looks at the rest of the local buffer (this rank's own gradient before the
        reduce-scatter), so a non-finite local gradient anywhere makes every rank skip."""
        pieces = [(x.grad, dp_utils.is_tensor_parallel_unique(x.param)) for x in self.pieces]
        if not self.distributed:
            return dp_utils.global_grad_norm(pieces, _ps().get_model_parallel_group())
        local = [(bucket.grads, False) for bucket in self.buckets]
        return dp_utils.global_grad_norm(pieces, None, extra_finite_check=local)

    def clip_(self, max_norm: float, total_norm: float) -> None:
        dp_utils.clip_grads_([x.grad for x in self.pieces], max_norm, total_norm)

    @torch.no_grad()
    def step(self) -> None:
        self.finish_param_sync()  # the previous step's gathers write the buffers this step writes
        self.optimizer.step()
        self.steps += 1
        if self.main_params_are_copies:
            for x in self.pieces:
                x.model.copy_(x.master)
        if self.distributed:
            for bucket in self.gather_order:
                lo, hi = bucket.share(self.dp_rank)
                bucket.gather = dist.all_gather_single(bucket.params, bucket.params[lo:hi], group=self.group,
                                                       async_op=self.overlap_param_gather)

    def finish_param_sync(self) -> None:
        """Wait for the weights' all-gathers still running (--overlap-param-gather): every weight is
        then the stepped one. Whatever reads or writes weights outside a forward calls this first."""
        self._finish_gathers(self.gather_order)

    @staticmethod
    def _finish_gathers(buckets: list[Bucket]) -> None:
        for bucket in buckets:
            if bucket.gather is not None:
                bucket.gather.wait()
                bucket.gather = None

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
        self.finish_param_sync()
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
        self.finish_param_sync()
        for x in self.pieces:
            if x.master is not x.model:
                x.master.copy_(x.model)

    # -- for tests and the memory measurement -----------------------------------------------------
    def state_tensors(self) -> list[torch.Tensor]:
        return [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]

    def master_tensors(self) -> list[torch.Tensor]:
        return [x.master for x in self.pieces if x.master is not x.model]

