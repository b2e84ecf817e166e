"""Candidate search: every layout of a model on a cluster that fits, fastest first."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Optional

from megallm.config import Config, validate
from megallm.planner.devices import get_device
from megallm.planner.layout import RECOMPUTE, PlanError, make_layout
from megallm.planner.plan import Plan, plan_layout
from megallm.planner.throughput import Assumptions


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_configs(cfg: Config, world_size: int, gpus_per_node: int,
                      micro_batch_sizes: Iterable[int], max_chunk_layers: int = 1) -> Iterable[Config]:
    """Configs differing from cfg in tp, pp, vpp and micro batch size that pass validate().

    tp stays inside a node (its all-reduces run every layer); pp divides the layer count; vpp
    ranges over the interleavings with at least max_chunk_layers layers per chunk; the global
    batch size is the config's.
    """
    m = cfg.model
    for tp in _divisors(gpus_per_node):
        for pp in _divisors(m.num_layers):
            if world_size % (tp * pp):
                continue
            vpps = [None] + [v for v in _divisors(m.num_layers // pp)[1:]
                             if pp > 1 and m.num_layers // (pp * v) >= max_chunk_layers]
            for vpp in vpps:
                for mbs in micro_batch_sizes:
                    c = copy.deepcopy(cfg)
                    c.parallel.tensor_model_parallel_size, c.parallel.pipeline_model_parallel_size = tp, pp
                    c.parallel.virtual_pipeline_model_parallel_size = vpp
                    if vpp is None and c.parallel.pipeline_schedule in ("interleaved_1f1b", "zero_bubble"):
                        c.parallel.pipeline_schedule = "1f1b"
                    elif vpp is not None and c.parallel.pipeline_schedule in ("1f1b", "gpipe"):
                        c.parallel.pipeline_schedule = "interleaved_1f1b"
                    c.training.micro_batch_size = mbs
                    if not validate(c, world_size):
                        yield c


def search(cfg: Config, nodes: int, gpus_per_node: int, device: str = "h100-80gb",
           recompute: Iterable[str] = RECOMPUTE, distributed_optimizer: Iterable[bool] = (False, True),
           micro_batch_sizes: Iterable[int] = (1, 2, 4, 8), sequence_parallel: Optional[bool] = None,
           precision: Optional[str] = None, flash_attention: bool = True,
           assumptions: Optional[Assumptions] = None) -> list[Plan]:
    """Layouts (tp, pp, vpp, dp, micro batch, recompute, ZeRO-1, and sequence parallelism unless
    `sequence_parallel` fixes it) of cfg's model and global batch
    on nodes x gpus_per_node devices that fit, ranked by predicted tokens/s (then by margin).
    Raises PlanError when the config itself is invalid (its model, not its layout)."""
    dev, world_size = get_device(device), nodes * gpus_per_node
    assumptions = assumptions or Assumptions()
    recompute, distributed_optimizer = list(recompute), list(distributed_optimizer)
    base = copy.deepcopy(cfg)
    base.parallel.tensor_model_parallel_size = base.parallel.pipeline_model_parallel_size = 1
    base.parallel.virtual_pipeline_model_parallel_size = None
    errors = validate(base)  # without a world size: the model and training rules only
    if errors:
        raise PlanError("; ".join(errors))
    plans = []
    for c in candidate_configs(cfg, world_size, gpus_per_node, micro_batch_sizes):
        for zero in distributed_optimizer:
            c.parallel.use_distributed_optimizer = zero
            tp = c.parallel.tensor_model_parallel_size
            sps = [sequence_parallel] if sequence_parallel is not None else ([False, True] if tp > 1 else [False])
            for sp in sps:
                for rc in recompute:
                    layout = make_layout(c, world_size, dev, rc, sp, precision, flash_attention)
                    p = plan_layout(c, layout, dev, gpus_per_node, assumptions)
                    if p.fits:
                        plans.append(p)
    plans.sort(key=lambda p: (-p.tokens_per_s, -p.margin_bytes))
    return plans
