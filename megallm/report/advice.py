"""What to change, from the config and the run; every line carries its evidence.

The thresholds are the LLaMA2 recipe and the pitfalls seen in real 70B runs (docs/references.md):
beta2 0.95, eps 1e-8, weight decay 0.1, no dropout, warmup 1% of training, lr 3e-4 at 4M-token
batches.
"""

from __future__ import annotations

import math
from typing import Optional

from megallm.config import Config, warmup_iters

# LR rule: LLaMA2-7B trained at 3e-4 with 4M-token batches (1024 x 4096); under the square-root
# scaling rule for Adam, a batch of B tokens tolerates about 3e-4 * sqrt(B / 4M). Small models
# tolerate more than this rule says, so the line is advice, weighed against the spikes seen.
REFERENCE_LR = 3e-4
REFERENCE_BATCH_TOKENS = 1024 * 4096


def reference_lr(batch_tokens: int) -> float:
    return REFERENCE_LR * math.sqrt(batch_tokens / REFERENCE_BATCH_TOKENS)


def _iterations(its: list[int], limit: int = 8) -> str:
    its = sorted(set(its))
    shown = ", ".join(str(i) for i in its[:limit])
    return shown + (f" (+{len(its) - limit} more)" if len(its) > limit else "")


def advise(cfg: Optional[Config], spikes: list[dict], repeated_documents: list[dict],
           config_source: str) -> list[dict]:
    """[{"rule", "message", "evidence"}]; an empty list means nothing to change."""
    out = []
    spike_its = [s["iteration"] for s in spikes]
    in_run = (f"{len(spike_its)} spikes in this run (iterations {_iterations(spike_its)})" if spike_its
              else "no spikes in this run")

    def add(rule: str, message: str, evidence: str) -> None:
        out.append({"rule": rule, "message": message, "evidence": evidence})

    if cfg is not None:
        o, m, t = cfg.optimizer, cfg.model, cfg.training
        src = f"{config_source}"
        if o.adam_beta2 > 0.95:
            add("adam_beta2", "lower adam_beta2 to 0.95: 0.999 let the second moment lag behind sudden "
                "gradient growth and caused loss spikes in LLaMA2-scale runs",
                f"adam_beta2={o.adam_beta2} > 0.95 ({src}); {in_run}")
        if o.adam_eps >= 1e-6:
            add("adam_eps", "lower adam_eps to 1e-8: at 1e-6 or more it damps the updates of rarely "
                "updated parameters, and raising it is not a spike fix",
                f"adam_eps={o.adam_eps} >= 1e-6 ({src}); {in_run}")
        if o.weight_decay < 0.1:
            add("weight_decay", "raise weight_decay to 0.1: 0.01 was seen to spike in bf16 70B runs",
                f"weight_decay={o.weight_decay} < 0.1 ({src}); {in_run}")
        if m.hidden_dropout > 0 or m.attention_dropout > 0:
            add("dropout", "set hidden_dropout and attention_dropout to 0.0: LLaMA2 pretrains without dropout",
                f"hidden_dropout={m.hidden_dropout}, attention_dropout={m.attention_dropout} ({src})")
        warmup = warmup_iters(cfg)
        if warmup == 0:
            add("warmup", "add warmup: lr_warmup_fraction 0.01 (LLaMA2: 1% of training, linear from min_lr)",
                f"no warmup: lr_warmup_iters={o.lr_warmup_iters}, lr_warmup_fraction={o.lr_warmup_fraction} "
                f"({src}); {in_run}")
        elif warmup < 0.01 * t.train_iters:
            add("warmup", f"lengthen warmup to at least {math.ceil(0.01 * t.train_iters)} iterations "
                "(1% of train_iters)",
                f"warmup of {warmup} iterations is under 1% of train_iters={t.train_iters} ({src}); {in_run}")
        batch_tokens = t.global_batch_size * t.seq_length
        limit = reference_lr(batch_tokens)
        if o.lr > limit:
            add("lr_for_batch", f"lr is high for the global batch: the rule 3e-4 x sqrt(batch_tokens / 4M) "
                f"gives {limit:.2g} here; lower lr or grow global_batch_size (small models tolerate more, "
                f"so weigh this against the spikes)",
                f"lr={o.lr} > {limit:.2g} for {t.global_batch_size} x {t.seq_length} = {batch_tokens:,} "
                f"tokens per step ({src}); {in_run}")

    nonfinite = [s["iteration"] for s in spikes if str(s.get("reason", "")).startswith("nonfinite")]
    if nonfinite:
        add("nonfinite", "non-finite loss or grad norm: check the batch's data (see the table) and, in bf16, "
            "overflow in attention logits or the output layer; a lower lr or longer warmup helps if it recurs",
            f"{len(nonfinite)} non-finite steps at iterations {_iterations(nonfinite)}")

    # Documents that share the same spikes are one finding (a re-run batch repeats all of its
    # documents), so they are grouped into one line per set of spike iterations.
    groups: dict[tuple, list[dict]] = {}
    for doc in repeated_documents:
        groups.setdefault(tuple(doc["iterations"]), []).append(doc)
    for its, docs in groups.items():
        k = max(d["spikes"] for d in docs)
        where = [(d["source"] or f"{d['dataset']} document {d['document']}") + f" ({d['samples']} samples)"
                 for d in docs]
        shown = ", ".join(where[:5]) + (f" (+{len(where) - 5} more)" if len(where) > 5 else "")
        add("repeated_documents", f"the same documents appear in {k} spikes: inspect them and leave their "
            f"samples out of the rerun (spike_report.py --skip-list FILE, then pretrain_llama2.py "
            f"--exclude-samples FILE); a long document spans many samples and can reach several batches "
            f"by chance, a short one cannot",
            f"{len(docs)} document(s) in the batches of iterations {_iterations(list(its))}: {shown}")
    return out
