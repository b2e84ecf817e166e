"""Fault injection for tests, switched on by environment variables (all off by default).

    MEGALLM_INJECT_NAN="R:I,R:sS,..."  poison global rank R's fp32 main grad after the dp reduction (a NaN
                                      only that rank sees) at iteration I, or whenever its global
                                      batch holds stream position S (a "bad sample" that follows the
                                      data through rollbacks and resumes)
    MEGALLM_PLANT_JUNK="A-B,..."      replace the tokens of dataset samples A..B-1 (as the sampler reads
                                      them) with uniformly random ids, seeded by the sample index, so
                                      every rank plants the same junk: a bad data block that fills
                                      whole batches, which the corpus' own shuffling never produces
    MEGALLM_CRASH_IN_SAVE="I"         rank 0 dies (os._exit) while writing checkpoint I, after the
                                      files are written and before the directory is renamed
    MEGALLM_SLOW_SAVE="I:S"           every rank's checkpoint writer sleeps S seconds while writing
                                      checkpoint I (files written, not yet hashed nor committed)
    MEGALLM_HANG="R:I:MARKER"         rank R stops responding at iteration I (sleeps) unless MARKER
                                      exists, which it creates: the restarted job runs through
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist


def _entries(var: str) -> list[list[str]]:
    spec = os.environ.get(var, "")
    return [item.split(":") for item in spec.split(",") if item]


def maybe_poison_gradients(params, iteration: int, consumed_before: int, global_batch_size: int) -> None:
    for rank, when in _entries("MEGALLM_INJECT_NAN"):
        if int(rank) != dist.get_rank():
            continue
        hit = (consumed_before <= int(when[1:]) < consumed_before + global_batch_size if when.startswith("s")
               else int(when) == iteration)
        if hit:
            for p in params:
                grad = getattr(p, "main_grad", p.grad)  # the fp32 gradient the optimizer steps from
                if grad is not None:
                    grad.view(-1)[0] = float("nan")
                    return


def maybe_plant_junk(tokens: torch.Tensor, labels: torch.Tensor, samples, vocab_size: int):
    spec = os.environ.get("MEGALLM_PLANT_JUNK", "")
    ranges = [tuple(int(v) for v in item.split("-")) for item in spec.split(",") if item]
    if not ranges:
        return tokens, labels
    for row, sample in enumerate(int(s) for s in samples):
        if any(a <= sample < b for a, b in ranges):
            g = torch.Generator().manual_seed(sample)
            junk = torch.randint(0, vocab_size, (tokens.shape[1] + 1,), generator=g)
            tokens[row], labels[row] = junk[:-1], junk[1:]
    return tokens, labels


def maybe_crash_in_save(iteration: int) -> None:
    if os.environ.get("MEGALLM_CRASH_IN_SAVE") == str(iteration) and dist.get_rank() == 0:
        os._exit(17)


def maybe_stall_in_write(iteration: int) -> None:
    for it, seconds in _entries("MEGALLM_SLOW_SAVE"):
        if int(it) == iteration:
            time.sleep(float(seconds))


def maybe_hang(iteration: int) -> None:
    for rank, it, marker in _entries("MEGALLM_HANG"):
        if int(rank) == dist.get_rank() and int(it) == iteration and not Path(marker).exists():
            Path(marker).touch()
            while True:
                time.sleep(60)
