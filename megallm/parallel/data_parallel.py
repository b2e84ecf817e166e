"""Data parallelism and the reductions that make every rank see the same numbers.

- The gradient reduction itself lives with the optimizer (megallm.parallel.distributed_optimizer).
- The global gradient norm over tensor, pipeline and data parallel ranks, counting parameters that
  are replicated across tensor-parallel ranks (the RMSNorm weights) once.
- The global loss: mean over micro-batches and data-parallel ranks, made on the last pipeline
  stage and broadcast to every rank, so the spike detector decides from identical values.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch
import torch.distributed as dist


def _ps():
    from megatron.core import parallel_state

    return parallel_state


def is_tensor_parallel_unique(p: torch.Tensor) -> bool:
    """True for a parameter whose values this rank alone holds (a shard), or the tp-rank-0 copy of a
    replicated one: the set of parameters that makes up the model exactly once per tp group."""
    return bool(getattr(p, "tensor_model_parallel", False)) or _ps().get_tensor_model_parallel_rank() == 0


def global_grad_norm(grads: Iterable[tuple[torch.Tensor, bool]], group,
                     extra_finite_check: Iterable[tuple[torch.Tensor, bool]] = ()) -> tuple[torch.Tensor, bool]:
    """L2 norm of the whole model's gradient, and whether any rank of `group` holds a NaN/Inf.

    grads: (reduced gradient, counted) pairs that, summed over `group`, cover the model exactly
    once where counted is True; tensor-parallel-replicated parameters are counted on tp rank 0
    only (is_tensor_parallel_unique). Without a distributed optimizer the data-parallel replicas
    hold equal gradients and `group` is the model-parallel (tp x pp) group; with one, each rank
    passes its share and `group` is the whole world (None). The non-finite flag looks at every
    tensor given, uncounted ones and `extra_finite_check` included: a NaN in tp rank 1's copy of a
    norm weight is outside the norm but would still poison that rank's weights. The flag rides in
    the norm's all-reduce; global_loss carries it on to the other replicas."""
    grads = list(grads)
    device = grads[0][0].device if grads else torch.device("cpu")
    counted = torch.zeros((), dtype=torch.float64, device=device)
    uncounted = torch.zeros((), dtype=torch.float64, device=device)
    for g, unique in [*grads, *[(t, False) for t, _ in extra_finite_check]]:
        # accumulated in float64 inside the reduction, without a float64 copy of the gradient (7x faster)
        sq = torch.linalg.vector_norm(g.detach(), dtype=torch.float64).square()
        if unique:
            counted += sq
        else:
            uncounted += sq
    local_nonfinite = (~torch.isfinite(counted + uncounted)).double()
    packed = torch.stack([counted, local_nonfinite])  # [sum of squares, ranks with a NaN/Inf]
    dist.all_reduce(packed, group=group)
    return packed[0].sqrt().float(), bool(packed[1] > 0)


def clip_grads_(grads: Iterable[torch.Tensor], max_norm: float, total_norm: float) -> None:
    if max_norm <= 0:  # Megatron's --clip-grad 0: no clipping (not a multiplication by zero)
        return
    coef = max_norm / (float(total_norm) + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)


def global_loss(local_losses: Optional[list[torch.Tensor]], device: torch.device,
                nonfinite: bool = False) -> tuple[float, bool]:
    """Mean loss over micro-batches and data-parallel ranks, the same float on every rank, and the
    OR of `nonfinite` (each replica's flag from global_grad_norm) over every rank.

    The flag travels in the loss's own collectives (all-reduce over data parallel on the last
    stage, broadcast down the pipeline), so a rank-local NaN reaches every rank without a
    collective of its own."""
    ps = _ps()
    packed = torch.zeros(2, dtype=torch.float64, device=device)  # [loss, replicas with a NaN/Inf]
    if local_losses is not None:
        packed[0] = torch.stack([loss.double() for loss in local_losses]).mean()
        packed[1] = float(nonfinite)
        dist.all_reduce(packed, group=ps.get_data_parallel_group())
        packed[0] /= ps.get_data_parallel_world_size()
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(packed, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return float(packed[0]), bool(packed[1] > 0)


def any_rank(flag: bool, device: torch.device) -> bool:
    """OR over all ranks: a rank-local NaN must make every rank skip, or the ranks diverge and hang."""
    t = torch.tensor(1.0 if flag else 0.0, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
