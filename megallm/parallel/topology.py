"""Process groups for tensor, pipeline and data parallelism, in Megatron's rank order.

megatron-core's `parallel_state` owns the groups used in training. The pure `rank_groups` below
says which global ranks share a group under that order (tp fastest, then dp, then pp: rank =
tp_rank + tp * (dp_rank + dp * pp_rank)), so tools that need the same layout without initialising
Megatron (the preflight checks, the planner) agree with training by construction.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RankGroups:
    tensor: list[list[int]]
    pipeline: list[list[int]]
    data: list[list[int]]

    def of(self, kind: str, rank: int) -> list[int]:
        return next(g for g in getattr(self, kind) if rank in g)


def rank_groups(world_size: int, tp: int, pp: int) -> RankGroups:
    assert world_size % (tp * pp) == 0, f"world size {world_size} is not a multiple of tp x pp = {tp} x {pp}"
    dp = world_size // (tp * pp)

    def rank(t: int, d: int, p: int) -> int:
        return t + tp * (d + dp * p)

    return RankGroups(
        tensor=[[rank(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)],
        pipeline=[[rank(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)],
        data=[[rank(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)],
    )


def init_world_of_one(backend: str = "gloo") -> None:
    """A one-rank default group, unless one exists: for building and running a model inside one
    process (meta-device stages, benchmarks, tests). Rendezvous goes through an explicit free port
    rather than MASTER_ADDR/RANK in the environment, which a torchrun started later from this
    process would inherit; a fixed port would collide with a job already running."""
    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def initialize_model_parallel(tp: int, pp: int, vpp: int | None = None, timeout_minutes: int = 10) -> None:
    """Megatron's process groups, made on whatever backend the default group uses."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
        # megatron only forgets its groups; torch keeps them, each gloo group with its own threads,
        # and a process that lays out one layout after another (the multi-scenario test workers)
        # ended up with hundreds of gloo I/O threads competing for the cores. Destroy them here.
        for group in list(dist.distributed_c10d._world.pg_map):
            if group is not dist.group.WORLD:
                dist.destroy_process_group(group)
    # gloo groups are only needed by Megatron's distributed optimizer, which we do not use;
    # on CPU the default backend already is gloo.
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        distributed_timeout_minutes=timeout_minutes,
        create_gloo_process_groups=torch.cuda.is_available(),
    )
