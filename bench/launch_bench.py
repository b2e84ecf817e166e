"""Sections 4 and 5: start-up of a multi-process launch by part, and the spike detector's overhead.

    result = measure(out_dir, nproc=8, overrides={"tp": 2, "pp": 2}, iters=15, warmup=3)

One torchrun launch of bench/launch_worker.py; the parts are read from the ranks' wall-clock marks
(see that file). A part's figure is the median over ranks, and 'slowest' the latest rank: the
launch can start training only when the slowest rank is ready.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from benchlib import ROOT, median, percentile

PARTS = [  # (mark that ends the part, label)
    ("worker_start", "torchrun + Python start-up"),
    ("import_torch", "import torch"),
    ("import_megatron", "import megatron.core + megallm"),
    ("init_process_group", "init_process_group (gloo rendezvous)"),
    ("model_parallel_groups", "megatron model-parallel groups"),
    ("trainer_build", "Trainer.build (model, init, pipeline warm-up step, optimizer buffers, data)"),
    ("first_iteration", "first iteration"),
]
BUILD_PARTS = [("model_chunks", "model chunks"), ("init_weights", "weight init"),
               ("pipeline_warmup_step", "pipeline warm-up step"), ("datasets", "datasets")]


def startup_parts(ranks: list[dict]) -> list[dict]:
    """[{part, median_s, slowest_s}] in order, then the build's own parts and the total."""
    rows, previous = [], "launch"
    for mark, label in PARTS:
        durations = [r["marks"][mark] - r["marks"][previous] for r in ranks]
        rows.append({"part": label, "median_s": median(durations), "slowest_s": max(durations)})
        previous = mark
    for key, label in BUILD_PARTS:
        durations = [r["build"].get(key, 0.0) for r in ranks]
        rows.append({"part": f"  of which {label}", "median_s": median(durations), "slowest_s": max(durations)})
    total = [r["marks"]["first_iteration"] - r["marks"]["launch"] for r in ranks]
    rows.append({"part": "launch to end of first iteration", "median_s": median(total), "slowest_s": max(total)})
    return rows


def spike_overhead(ranks: list[dict], phase: str) -> dict:
    """spike_check_ms / elapsed_ms over every rank's timed iterations."""
    records = [rec for r in ranks for rec in r["spike"][phase]]
    shares = [rec["spike_check_ms"] / rec["elapsed_ms"] for rec in records]
    return {"samples": len(shares), "median": median(shares), "p90": percentile(shares, 90), "max": max(shares),
            "spike_ms_median": median(rec["spike_check_ms"] for rec in records),
            "elapsed_ms_median": median(rec["elapsed_ms"] for rec in records),
            "tokens_per_s": median(rec["tokens_per_sec"] for rec in records)}


def measure(out: Path, nproc: int = 8, overrides: dict | None = None, iters: int = 15, warmup: int = 3,
            config: str = "configs/tiny.yaml") -> dict:
    sys.path.insert(0, str(ROOT))
    from tests.launch import torchrun

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("launch_rank*.json"):
        old.unlink()
    overrides = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2, "spike_min_history": 4,
                 **(overrides or {})}
    spec = out / "launch_spec.json"
    spec.write_text(json.dumps({"config": str(ROOT / config), "out": str(out), "overrides": overrides,
                                "iters": iters, "warmup": warmup}))
    start = time.time()
    torchrun(nproc, "bench/launch_worker.py", str(spec), timeout=1200, env={"BENCH_LAUNCH_T0": repr(start)})
    wall = time.time() - start
    ranks = [json.loads((out / f"launch_rank{r}.json").read_text()) for r in range(nproc)]
    return {"nproc": nproc, "overrides": overrides, "launch_wall_s": wall, "parts": startup_parts(ranks),
            "spike": {phase: spike_overhead(ranks, phase) for phase in ("as_is", "synced")},
            "iters": iters, "warmup": warmup, "cores": os.cpu_count()}
