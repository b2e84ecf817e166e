"""AdamW under Megatron's OptimizerParamScheduler (linear warmup, then cosine or linear decay).

Norm weights (1-D) get no weight decay, as in Megatron. The scheduler counts optimizer steps, not
iterations: a skipped iteration does not advance the learning-rate schedule.
"""

from __future__ import annotations

import torch
from torch import nn

from megallm.config import Config, warmup_iters
from megallm.parallel.data_parallel import zero1_optimizer


def param_groups(chunks: list[nn.Module]) -> list[dict]:
    params = [p for c in chunks for p in c.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "wd_mult": 1.0},
        {"params": [p for p in params if p.ndim < 2], "wd_mult": 0.0},
    ]


def build_optimizer(chunks: list[nn.Module], cfg: Config) -> torch.optim.Optimizer:
    o = cfg.optimizer
    kwargs = dict(lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, weight_decay=o.weight_decay)
    # foreach=False keeps the update bitwise independent of how parameters are grouped and
    # partitioned (ZeRO-1 puts different parameter sets on each rank): the layout-equivalence
    # tests rely on it, and on CPU the fused/foreach paths win nothing measurable.
    kwargs["foreach"] = torch.cuda.is_available()
    if cfg.parallel.use_distributed_optimizer:
        return zero1_optimizer(param_groups(chunks), torch.optim.AdamW, **kwargs)
    return torch.optim.AdamW(param_groups(chunks), **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config):
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


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
