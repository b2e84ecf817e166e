"""Section 1: megallm at tp = pp = 1 against HuggingFace LlamaForCausalLM + torch.optim.AdamW.

One process, one model config, the same global batch of micro-batches on both sides, the HF model
loaded with megallm's initial weights (so the first losses must agree: the same model runs on both
sides). Iterations alternate megallm, HF, megallm, HF, ... so that a slow phase of the machine
(other processes, frequency changes) hits both alike; figures are medians.

    from train_vs_hf import compare
    result = compare(cfg, iters=20, warmup=3)
"""

from __future__ import annotations

import torch
from benchlib import median, percentile
from side_by_side import HFTrainer, hf_state_dict, timed, world_of_one

from megallm.config import Config


def compare(cfg: Config, iters: int, warmup: int) -> dict:
    from megallm.training.loop import Trainer

    world_of_one()
    tr = Trainer.build(cfg, 1)
    hf = HFTrainer(cfg, tr.device, state_dict=hf_state_dict(tr.chunks[0], cfg))
    tokens_per_iteration = cfg.training.global_batch_size * cfg.training.seq_length
    ours, theirs, spike_share, first = [], [], [], {}
    for i in range(warmup + iters):
        consumed = tr.consumed_samples  # HF reads the same batch, through the same loader
        record, s_ours = timed(tr.train_step, tr.device)
        loss_hf, s_hf = timed(lambda: hf.step(*tr.local_batch(tr.train_ds, consumed)), tr.device)
        if i == 0:
            first = {"megallm": record["loss"], "hf": loss_hf}
        if i >= warmup:
            ours.append(s_ours)
            theirs.append(s_hf)
            spike_share.append(record["spike_check_ms"] / record["elapsed_ms"])
    tr.logger.close()
    return {
        "tokens_per_iteration": tokens_per_iteration, "iters": iters, "warmup": warmup,
        "threads": torch.get_num_threads(), "first_loss": first,
        "megallm_s": ours, "hf_s": theirs,
        "megallm_tokens_per_s": tokens_per_iteration / median(ours),
        "hf_tokens_per_s": tokens_per_iteration / median(theirs),
        # per-pair ratios: each pair ran back to back, so the machine's state cancels within it
        "pair_ratio_median": median(h / o for o, h in zip(ours, theirs)),
        "pair_ratio_p10": percentile([h / o for o, h in zip(ours, theirs)], 10),
        "pair_ratio_p90": percentile([h / o for o, h in zip(ours, theirs)], 90),
        "spike_share": spike_share,
    }
