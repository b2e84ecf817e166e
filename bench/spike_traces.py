"""Recording the spike benchmark's traces: real runs of the tiny model, one process, every
iteration's globally reduced loss and grad norm with its ground truth.

    python bench/spikes.py --record [--only NAME]   # writes bench/traces/NAME.jsonl

Each trace is a JSONL file: a header {"scenario", "kind", "overrides", "env", ...}, then one line per
iteration {"iteration", "loss", "grad_norm", "lr", "junk_fraction", "label"}. The label is the
ground truth of what was planted in that iteration's batch:
    spike      the batch is mostly planted junk (>= half its tokens), a NaN was injected, or, in the
               instability scenario, the loss exceeds 1.4x the median of the 20 iterations before it
    ambiguous  some junk, under half the batch: counted neither as a miss nor as a false skip
    clean      nothing planted
The runs use spike_action=warn, so the detector never changes the trace; detectors are compared
offline on the same numbers (bench/spikes.py), each skipping what it flags.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT / "bench" / "traces"
CACHE = ROOT / "data_cache" / "spike_bench"
JUNK_DOCS, JUNK_LEN = 12, 512


def _clean(name, seed, gbs, lr, iters, warmup=20):
    return {"name": name, "kind": "clean", "overrides": {"seed": seed, "global_batch_size": gbs,
            "micro_batch_size": gbs, "lr": lr, "train_iters": iters, "lr_warmup_iters": warmup}}


# The run (six plays + a dozen random-subword documents, one 128-token sequence a step,
# lr 1e-2, beta2 0.999, 300 iterations), planted junk batches, too high an lr with beta2 0.999 and a
# short warm-up, a NaN gradient, and clean runs over seeds, batch sizes and lrs.
SCENARIOS = [
    *[{"name": f"junkdocs_s{seed}", "kind": "junkdocs", "overrides": {
        "seed": seed, "global_batch_size": 1, "micro_batch_size": 1, "lr": 1e-2, "adam_beta2": 0.999,
        "train_iters": 300}} for seed in (1234, 7, 8, 9)],
    {"name": "planted_batches", "kind": "planted", "planted_iterations": [40, 41, 75, 110, 111, 112, 150, 180],
     "overrides": {"seed": 11, "global_batch_size": 4, "micro_batch_size": 4, "train_iters": 200}},
    {"name": "planted_batches_b1", "kind": "planted", "planted_iterations": [30, 60, 61, 120, 200, 250, 251, 252],
     "overrides": {"seed": 13, "global_batch_size": 1, "micro_batch_size": 1, "train_iters": 300}},
    *[{"name": f"high_lr_beta2_s{seed}", "kind": "instability", "overrides": {
        "seed": seed, "global_batch_size": 2, "micro_batch_size": 2, "lr": 3e-2, "adam_beta2": 0.999,
        "lr_warmup_iters": 2, "train_iters": 200}} for seed in (3, 4)],
    {"name": "nan_one_rank", "kind": "nan", "nan_iterations": [60, 61, 130],
     "overrides": {"seed": 5, "global_batch_size": 1, "micro_batch_size": 1, "train_iters": 160}},
    *[_clean(f"clean_b1_lr{lr:g}_s{seed}", seed, 1, lr, 300, warmup=w)
      for seed, lr, w in ((1, 1e-3, 20), (2, 3e-3, 20), (3, 1e-2, 20), (21, 1.5e-3, 0), (22, 6e-3, 5), (23, 3e-3, 50))],
    *[_clean(f"clean_b2_lr{lr:g}_s{seed}", seed, 2, lr, 300, warmup=w)
      for seed, lr, w in ((31, 1.5e-3, 20), (32, 6e-3, 5))],
    _clean("clean_b4_lr1.5e-3_s4", 4, 4, 1.5e-3, 200),
    _clean("clean_b4_lr6e-3_s5", 5, 4, 6e-3, 200, warmup=5),
    # batch 16 last: on a loaded 2-core machine an iteration takes seconds
    {"name": "planted_batches_b16", "kind": "planted", "planted_iterations": [30, 31, 60],
     "overrides": {"seed": 12, "global_batch_size": 16, "micro_batch_size": 16, "train_iters": 80}},
    _clean("clean_b16_lr1.5e-3_s7", 7, 16, 1.5e-3, 80),
]


def demo_data(max_files: int = 6):
    """Six plays, their tokenizer and dataset; and the same with a dozen random-subword documents."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megallm.data.corpus import prepare_demo_data, write_junk_dataset

    prefix, tokenizer = prepare_demo_data(CACHE, vocab_size=4096, workers=1, max_files=max_files)
    junk_prefix = str(CACHE / "junkdocs")
    if not os.path.exists(junk_prefix + ".idx"):
        n = len(IndexedDataset(prefix)) + JUNK_DOCS
        positions = sorted(np.random.default_rng(0).choice(n, JUNK_DOCS, replace=False).tolist())
        write_junk_dataset(prefix, junk_prefix, 4096, positions, JUNK_LEN, seed=0)
    return prefix, junk_prefix, tokenizer


def junk_tokens(gpt_dataset, sample: int, junk_docs: set[int]) -> tuple[int, int]:
    """(junk tokens, all tokens) of one GPTDataset sample, read from its indices like
    megallm.data.provenance.sample_documents does."""
    i = int(gpt_dataset.shuffle_index[sample])
    (d0, o0), (d1, o1) = gpt_dataset.sample_index[i], gpt_dataset.sample_index[i + 1]
    lengths = gpt_dataset.dataset.sequence_lengths
    junk = total = 0
    for pos in range(int(d0), int(d1) + 1):
        doc = int(gpt_dataset.document_index[pos])
        start = int(o0) if pos == d0 else 0
        stop = int(o1) + 1 if pos == d1 else int(lengths[doc])
        total += stop - start
        junk += (stop - start) if doc in junk_docs else 0
    return junk, total


def label_instability(losses: list[float], factor: float = 1.4, lookback: int = 20) -> list[str]:
    out = []
    for i, x in enumerate(losses):
        before = [v for v in losses[max(0, i - lookback):i] if np.isfinite(v)]
        spike = len(before) == lookback and x > factor * statistics.median(before)
        out.append("spike" if spike else "clean")
    return out


def record(sc: dict, nproc_note: str = "1 process", trace_dir: Path = TRACES) -> Path:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megallm.config import apply_overrides, load_yaml
    from megallm.parallel.topology import init_world_of_one, initialize_model_parallel
    from megallm.training.loop import Trainer

    init_world_of_one()
    if not parallel_state.model_parallel_is_initialized():
        initialize_model_parallel(1, 1)
    clean_prefix, junk_prefix, tokenizer = demo_data()
    data = junk_prefix if sc["kind"] == "junkdocs" else clean_prefix
    log_dir = CACHE / "runs" / sc["name"]
    cfg = apply_overrides(load_yaml(ROOT / "configs" / "tiny.yaml"), {
        "data_path": [data], "tokenizer_model": str(tokenizer), "data_cache_path": str(CACHE / "idx"),
        "eval_interval": 0, "log_dir": str(log_dir), "tensorboard": False, "spike_action": "warn",
        "save_interval": 0, "log_interval": 1000, **sc["overrides"]})
    env = {}
    gbs = cfg.training.global_batch_size
    if sc["kind"] == "planted":
        env["MEGALLM_PLANT_JUNK"] = ",".join(f"{(i - 1) * gbs}-{i * gbs}" for i in sc["planted_iterations"])
    if sc["kind"] == "nan":
        env["MEGALLM_INJECT_NAN"] = ",".join(f"0:{i}" for i in sc["nan_iterations"])
    os.environ.update(env)
    try:
        tr = Trainer.build(cfg, dist.get_world_size())
        records = []
        tr.callbacks.append(lambda _, record: records.append(record))
        tr.train()
        tr.logger.close()
    finally:
        for k in env:
            os.environ.pop(k, None)

    junk_docs = set()
    if sc["kind"] == "junkdocs":
        from megallm.data.provenance import load_provenance
        prov = load_provenance(junk_prefix)
        junk_docs = {d for d in range(len(prov)) if prov.source(d).startswith("junk:")}
    lines = []
    for r in records:
        it = r["iteration"]
        fraction = 0.0
        if junk_docs:
            counts = [junk_tokens(tr.train_ds, s, junk_docs) for s in tr.global_batch_samples((it - 1) * gbs)]
            fraction = sum(j for j, _ in counts) / sum(t for _, t in counts)
        if sc["kind"] == "planted":
            fraction = 1.0 if it in sc["planted_iterations"] else 0.0
        label = ("spike" if fraction >= 0.5 else "ambiguous" if fraction > 0 else "clean")
        if sc["kind"] == "nan":
            label = "spike" if it in sc["nan_iterations"] else "clean"
        lines.append({"iteration": it, "loss": r["loss"], "grad_norm": r["grad_norm"], "lr": r["lr"],
                      "junk_fraction": round(fraction, 4), "label": label})
    if sc["kind"] == "instability":
        for line, label in zip(lines, label_instability([x["loss"] for x in lines])):
            line["label"] = label
    trace_dir.mkdir(parents=True, exist_ok=True)
    path = trace_dir / f"{sc['name']}.jsonl"
    header = {"scenario": sc["name"], "kind": sc["kind"], "overrides": sc["overrides"], "env": env,
              "config": "configs/tiny.yaml", "processes": nproc_note,
              "skipped": [r["iteration"] for r in records if r["skipped"]],
              "val_loss": next((r["val_loss"] for r in reversed(records) if "val_loss" in r), None)}
    path.write_text("".join(json.dumps(x) + "\n" for x in [header] + lines))
    return path


def load_trace(path: Path) -> tuple[dict, list[dict]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[0], rows[1:]
