"""Train/validation/test datasets: megatron-core's GPTDataset, blended by BlendedMegatronDatasetBuilder.

    --data-path PREFIX                      one dataset
    --data-path 0.7 A_text_document 0.3 B   a blend; weights are normalised
    --split 98,2,0                          documents of each dataset split train/valid/test
    --data-cache-path DIR                   megatron's index caches (default: PREFIX_DIR/cache,
                                            beside the first dataset)

Sizes asked of the builder: train = train_iters x global_batch_size (+ the number of excluded
samples, which the stream steps over), valid = (train_iters // eval_interval + 1) x eval_iters x
global_batch_size (each evaluation reads the next eval_iters global batches of the valid stream),
test = eval_iters x global_batch_size; valid and test are None without --eval-interval or where
--split gives them nothing.

With torch.distributed initialised build_datasets is collective: every rank calls it (rank 0
builds the caches, the others wait at megatron's barriers and then read them). Without it, it runs
in one process. With no --data-path it returns seeded random tokens (SyntheticDataset).

Every item is a dict with `tokens` and `labels` (LongTensor[seq_length], labels = tokens shifted
by one), `loss_mask` and `position_ids`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megallm.data.blend import ContinuedBlend, DataConfigError, dataset_key, parse_blend


def split_sizes(cfg, excluded: int = 0) -> list[int]:
    """[train, valid, test] sample counts to ask of the builder (module docstring)."""
    t = cfg.training
    train = t.train_iters * t.global_batch_size + excluded + rollback_headroom(cfg)
    if t.eval_interval <= 0:
        return [train, 0, 0]
    valid = (t.train_iters // t.eval_interval + 1) * t.eval_iters * t.global_batch_size
    return [train, valid, t.eval_iters * t.global_batch_size]


def rollback_headroom(cfg) -> int:
    """Samples a run with spike_action=rollback may step over beyond train_iters x global batch:
    each rollback replays at most save_interval + spike_skip_window iterations on fresh data and
    skips spike_rollback_skip_samples more."""
    sp, t = cfg.spike, cfg.training
    if sp.spike_action != "rollback":
        return 0
    per_rollback = ((cfg.checkpoint.save_interval + sp.spike_skip_window) * t.global_batch_size
                    + sp.spike_rollback_skip_samples)
    return sp.spike_max_rollbacks * per_rollback


def default_cache_path(prefixes: list[str]) -> str:
    return str(Path(prefixes[0]).resolve().parent / "cache")


class VocabOnlyTokenizer:
    """What GPTDataset reads from a tokenizer, for data given without --tokenizer-model: with
    eod-based masking off (our setting) it only needs the vocabulary size."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eod = -1
        self.pad = -1
        self.unique_identifiers = {"class": type(self).__name__, "vocab_size": vocab_size}


class SyntheticDataset(torch.utils.data.Dataset):
    """Seeded uniform random tokens in [0, vocab_size): item i is the same on every rank and run."""

    name = "synthetic"

    def __init__(self, size: int, seq_length: int, vocab_size: int, seed: int):
        self.size, self.seq_length, self.vocab_size, self.seed = size, seq_length, vocab_size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> dict:
        if not 0 <= idx < self.size:
            raise IndexError(f"sample {idx} outside the synthetic dataset of {self.size}")
        rng = np.random.default_rng([self.seed, int(idx)])
        text = torch.from_numpy(rng.integers(0, self.vocab_size, self.seq_length + 1))
        return {"tokens": text[:-1], "labels": text[1:], "loss_mask": torch.ones(self.seq_length),
                "position_ids": torch.arange(self.seq_length)}


@contextlib.contextmanager
def _rank_zero_if_single_process():
    """megatron-core 0.16.1's BlendedDataset calls torch.distributed.get_rank() on a cache miss
    without asking is_initialized(), which raises in a single process. There, this process is
    rank 0; say so for the duration of the build."""
    if torch.distributed.is_initialized():
        yield
        return
    real = torch.distributed.get_rank
    torch.distributed.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        torch.distributed.get_rank = real


def gpt_config(cfg, tokenizer, prefixes, weights):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=cfg.training.seed,
        sequence_length=cfg.training.seq_length,
        blend=(prefixes, weights),
        split=cfg.data.split,
        path_to_cache=cfg.data.data_cache_path or default_cache_path(prefixes),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # the model applies its causal mask itself
    )


def build_datasets(cfg, tokenizer=None, resume_state: Optional[dict] = None) -> tuple:
    """(train, valid, test) for `cfg` (megallm.config.Config); see the module docstring.
    `resume_state`: blend.data_state() as saved in the checkpoint; only used when --data-path
    differs from the one it was saved with (see blend.py for what a new blend reads)."""
    from megallm.data.sampler import load_exclude_samples

    exclude = load_exclude_samples(cfg.data.exclude_samples) if cfg.data.exclude_samples else set()
    sizes = split_sizes(cfg, len(exclude))
    t = cfg.training
    if not cfg.data.data_path:
        return tuple(SyntheticDataset(size, t.seq_length, cfg.model.vocab_size, t.seed + i) if size else None
                     for i, size in enumerate(sizes))
    prefixes, weights = parse_blend(list(cfg.data.data_path))
    missing = [p for p in prefixes if not (os.path.isfile(p + ".bin") and os.path.isfile(p + ".idx"))]
    if missing:  # checked on every rank before megatron's barriers, so all ranks stop alike
        raise DataConfigError(f"--data-path: no {missing[0]}.bin/.idx (give the prefix, without .bin/.idx)")
    if tokenizer is None:
        from megallm.data.tokenizer import load_tokenizer

        tokenizer = (load_tokenizer(cfg.data.tokenizer_model) if cfg.data.tokenizer_model
                     else VocabOnlyTokenizer(cfg.model.vocab_size))
    if resume_state and list(resume_state["data_path"]) != list(cfg.data.data_path):
        return _continue_with_new_blend(cfg, tokenizer, prefixes, weights, sizes, resume_state)
    return _build(cfg, tokenizer, prefixes, weights, sizes)


def _build(cfg, tokenizer, prefixes, weights, sizes) -> tuple:
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    config = gpt_config(cfg, tokenizer, prefixes, weights)
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config)
    with _rank_zero_if_single_process():
        datasets = builder.build()
    return tuple(ds if size and ds is not None and len(ds) else None for ds, size in zip(datasets, sizes))


def _continue_with_new_blend(cfg, tokenizer, prefixes, weights, sizes, state) -> tuple:
    from megallm.data.check import read_index

    if weights is None:  # megatron weighs an unweighted list by size; tokens are the size here
        weights = [float(np.sum(read_index(p)[0].lengths, dtype=np.int64)) for p in prefixes]
    weights = list(np.asarray(weights) / np.sum(weights))
    consumed = state["consumed_per_dataset"]
    offsets = [int(consumed.get(dataset_key(p), 0)) for p in prefixes]
    start = int(state["next_sample"])
    size = max(sizes[0] - start, 1)
    # Ask megatron for a blend large enough that dataset d holds offsets[d] + its new share
    # (its mid-level size is ceil(w_d * total * 1.005)); we keep its mid-level datasets only.
    total = int(max((o + 2) / w for o, w in zip(offsets, weights))) + size
    train, valid, test = _build(cfg, tokenizer, prefixes, weights, [total] + sizes[1:])
    earlier = {k: v for k, v in consumed.items() if k not in {dataset_key(p) for p in prefixes}}
    return ContinuedBlend(train.datasets, weights, size, start, offsets, earlier), valid, test
