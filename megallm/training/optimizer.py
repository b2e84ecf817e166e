"""AdamW under Megatron's OptimizerParamScheduler (linear warmup, then cosine or linear decay).

Norm weights (1-D) get no weight decay, as in Megatron. The optimizer is megallm's
DistributedOptimizer (fp32 main grads, optional ZeRO-1 sharding of masters and moments). The
scheduler counts optimizer steps, not iterations: a skipped iteration does not advance the
learning-rate schedule.
"""

from __future__ import annotations

import torch
from torch import nn

from megallm.config import Config, warmup_iters
from megallm.parallel.distributed_optimizer import DistributedOptimizer


def build_optimizer(chunks: list[nn.Module], cfg: Config, runner=None) -> DistributedOptimizer:
    """AdamW over fp32 main grads (and fp32 masters under bf16); with --use-distributed-optimizer
    each data-parallel rank keeps and steps a contiguous 1/dp of them (ZeRO-1). runner (the
    PipelineRunner) says how many gradients each parameter receives per iteration and what they are
    divided by, which --overlap-grad-reduce needs to know during backward."""
    o, p = cfg.optimizer, cfg.parallel
    if p.overlap_grad_reduce and runner is None:
        raise ValueError("overlap_grad_reduce needs the PipelineRunner (its micro-batches per iteration)")
    schedule = {}
    if runner is not None:
        schedule = {"microbatches": runner.n_microbatches, "microbatch_divisor": runner.microbatch_divisor}
    # foreach=False makes the update elementwise, so bitwise independent of how the flat buffer is
    # cut into per-rank pieces: the layout-equivalence tests rely on it, and on CPU the
    # fused/foreach paths win nothing measurable.
    return DistributedOptimizer(chunks, p.use_distributed_optimizer, foreach=torch.cuda.is_available(),
                                bucket_size=p.ddp_bucket_size, overlap_grad_reduce=p.overlap_grad_reduce,
                                overlap_param_gather=p.overlap_param_gather, **schedule,
                                lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                                weight_decay=o.weight_decay)


def build_scheduler(optimizer, cfg: Config):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optimizer
    return OptimizerParamScheduler(
        optimizer,
        init_lr=o.lr_warmup_init,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=warmup_iters(cfg),
        lr_decay_steps=o.lr_decay_iters or cfg.training.train_iters,
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=cfg.training.train_iters,
        wd_incr_style="constant",
    )


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
