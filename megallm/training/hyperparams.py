"""The one table of hyperparameter rules, read by the launcher's lint (megallm.config.lint_hyperparameters)
and by the spike report's advice (megallm.report.advice): settings that train but are known to
cause loss spikes or slow training, each with the value to use and a public source.

Sources:
  [llama2]   Touvron et al. 2023, "Llama 2", section 2.2: AdamW beta1 0.9, beta2 0.95, weight decay 0.1,
             clip 1.0, cosine schedule with 2000 warm-up steps, lr 3e-4 (7B, 13B) and 1.5e-4 (34B, 70B).
  [gpt3]     Brown et al. 2020, "Language Models are Few-Shot Learners", table 2.1: lr by model size,
             6e-4 at 125M down to 0.6e-4 at 175B; beta2 0.95, weight decay 0.1, linear warm-up.
  [proxies]  Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training
             instabilities", section 3.4: an AdamW epsilon near the gradients' RMS shrinks the updates of
             layers with small gradients; lr sensitivity grows with model size.
  [megatron] Megatron-LM's GPT-3 example scripts: --lr-warmup-fraction .01.
  [hf-llama] the released Llama 2 configs (attention_dropout 0.0): no dropout in pretraining.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

# (parameters, peak lr) of published recipes [gpt3, llama2]: a model is compared with the largest
# lr published for a model at least its size; below 125M the 125M figure applies.
PUBLISHED_LR = [(125e6, 6.0e-4), (350e6, 3.0e-4), (760e6, 2.5e-4), (1.3e9, 2.0e-4), (2.7e9, 1.6e-4),
                (7e9, 3.0e-4), (13e9, 3.0e-4), (34e9, 1.5e-4), (70e9, 1.5e-4), (175e9, 0.6e-4)]
LR_HEADROOM = 3.0  # smaller models tolerate more than their published lr; 3x is judgement, not a source

BETA2_MAX = 0.95  # [llama2], [gpt3]
EPS_MAX = 1e-6  # [proxies]: at or above the RMS of small gradients, eps damps their updates
WEIGHT_DECAY_MIN = 0.1  # [llama2], [gpt3]
WARMUP_MIN_FRACTION = 0.01  # [megatron]


def reference_lr(parameters: float) -> float:
    """The largest published peak lr for a model of at least `parameters` parameters."""
    bigger = [lr for n, lr in PUBLISHED_LR if n >= parameters] or [PUBLISHED_LR[-1][1]]
    return max(bigger)


@dataclass(frozen=True)
class Rule:
    name: str  # the advice's rule id
    check: Callable  # cfg -> None when fine, else the evidence ("adam_beta2=0.999 > 0.95")
    fix: str  # what to do, one line
    why: str  # the reason and its source


def _beta2(cfg):
    b = cfg.optimizer.adam_beta2
    return f"adam_beta2={b} > {BETA2_MAX}" if b > BETA2_MAX else None


def _eps(cfg):
    e = cfg.optimizer.adam_eps
    return f"adam_eps={e} >= {EPS_MAX:g}" if e >= EPS_MAX else None


def _weight_decay(cfg):
    w = cfg.optimizer.weight_decay
    return f"weight_decay={w} < {WEIGHT_DECAY_MIN}" if w < WEIGHT_DECAY_MIN else None


def _dropout(cfg):
    m = cfg.model
    if m.hidden_dropout > 0 or m.attention_dropout > 0:
        return f"hidden_dropout={m.hidden_dropout}, attention_dropout={m.attention_dropout}"
    return None


def _warmup(cfg):
    from megallm.config import warmup_iters

    o, warmup = cfg.optimizer, warmup_iters(cfg)
    if warmup == 0:
        return f"no warmup: lr_warmup_iters={o.lr_warmup_iters}, lr_warmup_fraction={o.lr_warmup_fraction}"
    need = math.ceil(WARMUP_MIN_FRACTION * cfg.training.train_iters)
    if warmup < need:
        return f"warmup of {warmup} iterations is under 1% of train_iters={cfg.training.train_iters} (use >= {need})"
    return None


def _lr(cfg):  # the report's old batch-size rule asked the demo's 1.8M-parameter model for lr 6.6e-6
    from megallm.config import parameter_count

    n = parameter_count(cfg.model)
    limit = LR_HEADROOM * reference_lr(n)
    if cfg.optimizer.lr > limit:
        return (f"lr={cfg.optimizer.lr} > {limit:.2g} (3x the published lr {reference_lr(n):.2g} for a model of "
                f"{n / 1e6:,.1f}M parameters or more)")
    return None


RULES = [
    Rule("adam_beta2", _beta2, "use adam_beta2 0.95",
         "a second moment that lags sudden gradient growth lets updates blow up: loss spikes "
         "(Llama 2 and GPT-3 papers)"),
    Rule("adam_eps", _eps, "use adam_eps 1e-8",
         "an epsilon near the gradients' RMS damps the updates of layers with small gradients "
         "(Wortsman et al. 2023); raising it is not a spike fix"),
    Rule("weight_decay", _weight_decay, "use weight_decay 0.1",
         "LLaMA2 and GPT-3 pretrain with 0.1; less lets weights and logits grow, which spikes in bf16 "
         "(Llama 2 and GPT-3 papers)"),
    Rule("dropout", _dropout, "use hidden_dropout and attention_dropout 0.0",
         "LLaMA2 pretrains without dropout (released Llama 2 configs)"),
    Rule("warmup", _warmup, "use lr_warmup_fraction 0.01 (linear from lr_warmup_init)",
         "every published recipe warms up; Adam's first steps are its noisiest "
         "(Llama 2, GPT-3 papers; Megatron-LM examples)"),
    Rule("lr", _lr, "lower lr towards the published lr for the model's size",
         "lr tolerance falls with model size (GPT-3 paper; Wortsman et al. 2023); far above the published "
         "figure spikes"),
]


def violations(cfg) -> list[tuple[Rule, str]]:
    """(rule, evidence) for each rule cfg breaks, in table order."""
    out = []
    for rule in RULES:
        evidence: Optional[str] = rule.check(cfg)
        if evidence:
            out.append((rule, evidence))
    return out
