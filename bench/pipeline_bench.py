"""Section 2: pipeline efficiency. Measured pipeline time against single-stage time x (1 + bubble).

    rows = measure(out_dir, pps=(2, 4), micro_batches=(4, 8, 16))   # one torchrun launch per pp

For each pipeline size p (dp = tp = 1, micro batch 1, global batch = m micro-batches) and each
schedule, bench/pipeline_worker.py measures in the same launch:
  measured   the pipeline step's wall time (barrier to barrier: the slowest rank);
  T_stage    the busiest rank's forward + backward over its chunks and the m micro-batches, run
             alone (the other ranks asleep at a barrier, so it has a core to itself);
and the planner gives the bubble b = (p - 1) / (v * m). The pipeline model predicts
T_stage x (1 + b); efficiency = predicted / measured (1.0: the schedule adds nothing but its
bubble; communication and scheduling overheads push it below 1).

With p ranks on C < p cores the stages cannot all run at once: the floor is then sum(T_stage) / C,
reported beside the model (it, not the bubble, bounds pp 4 on this 2-core machine).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from benchlib import ROOT, median

from megallm.config import apply_overrides, load_yaml

SCHEDULES = [  # (label, overrides)
    ("1F1B", {"pipeline_schedule": "1f1b"}),
    ("interleaved 1F1B, v=2", {"pipeline_schedule": "interleaved_1f1b", "virtual_pipeline_model_parallel_size": 2}),
    ("zero bubble (interleaved ZB), v=2",
     {"pipeline_schedule": "zero_bubble", "virtual_pipeline_model_parallel_size": 2}),
]
# 8 layers: pp 4 x v 2 needs a multiple of 8 (the tiny config has 4).
MODEL = {"num_layers": 8}


def scenarios(pp: int, micro_batches: tuple[int, ...], schedules=SCHEDULES) -> list[dict]:
    out = []
    for label, overrides in schedules:
        for m in micro_batches:
            name = f"pp{pp}_{overrides['pipeline_schedule']}_m{m}"
            out.append({"name": name, "label": label, "overrides": {
                **MODEL, **overrides, "pipeline_model_parallel_size": pp, "micro_batch_size": 1,
                "global_batch_size": m}})
    return out


def predicted_bubble(config: str, overrides: dict, world_size: int) -> float:
    from megallm.planner import plan

    cfg = apply_overrides(load_yaml(config), overrides)
    return plan(cfg, world_size, device="cpu", recompute="none").bubble_fraction


def analyse(result: dict, bubble: float, cores: int) -> dict:
    """One scenario's ranks -> the table's figures (seconds are per iteration)."""
    ranks = result["ranks"]
    measured = median(max(r["pipeline_s"][i] for r in ranks) for i in range(len(ranks[0]["pipeline_s"])))
    stage = [r["stage_s"] for r in ranks]
    predicted = max(stage) * (1 + bubble)
    floor = sum(stage) / min(cores, len(ranks))
    return {"measured_s": measured, "stage_max_s": max(stage), "stage_s": stage, "bubble": bubble,
            "predicted_s": predicted, "efficiency": predicted / measured, "core_floor_s": floor,
            "bound": max(predicted, floor), "efficiency_vs_bound": max(predicted, floor) / measured,
            "iteration_s": median(r for rk in ranks for r in rk["iteration_s"])}


def measure(out: Path, pps=(2, 4), micro_batches=(4, 8, 16), iters: int = 5, warmup: int = 2, repeats: int = 3,
            config: str = "configs/tiny.yaml", cores: int | None = None, schedules=SCHEDULES) -> list[dict]:
    sys.path.insert(0, str(ROOT))
    from tests.launch import torchrun

    cores = cores or os.cpu_count() or 1
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for pp in pps:
        scs = scenarios(pp, micro_batches, schedules)
        spec = out / f"pipeline_spec_pp{pp}.json"
        launched = [{**sc, "overrides": {**sc["overrides"], "log_dir": str(out / "logs" / sc["name"])}} for sc in scs]
        spec.write_text(json.dumps({"config": str(ROOT / config), "out": str(out), "iters": iters, "warmup": warmup,
                                    "repeats": repeats, "scenarios": launched}))
        torchrun(pp, "bench/pipeline_worker.py", str(spec), timeout=1200)
        for sc in scs:
            result = json.loads((out / f"{sc['name']}.json").read_text())
            bubble = predicted_bubble(str(ROOT / config), sc["overrides"], pp)
            rows.append({"pp": pp, "schedule": sc["label"], "m": result["num_micro_batches"],
                         **analyse(result, bubble, cores)})
    return rows
