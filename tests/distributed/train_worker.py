"""Runs several training scenarios in ONE torchrun launch (startup dominates on 2 CPU cores).

    torchrun --nproc-per-node N tests/distributed/train_worker.py SPEC.json

SPEC: {"config": "configs/tiny.yaml", "out": DIR, "scenarios": [{"name": ..., "overrides": {...},
       "load": DIR?, "save_final": bool?, "env": {...}?, "perturb_weights": float?, "watch_step": int?,
       "unchanged_step": int?}, ...]}  (the last three: see precision_checks.py)
Rank 0 writes DIR/<name>.json with the per-iteration records; a scenario that raises writes
{"error": message} and the launch goes on with the next scenario.
"""

import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist  # noqa: E402

from megallm import checkpoint  # noqa: E402
from megallm.training.loop import StopTraining, Trainer  # noqa: E402
from tests.distributed import precision_checks  # noqa: E402
from tests.distributed.scenarios import each_scenario, load_spec  # noqa: E402


def run(spec_path: str) -> None:
    spec = load_spec(spec_path)
    out = Path(spec["out"])
    world, rank = dist.get_world_size(), dist.get_rank()
    for sc, cfg in each_scenario(spec):
        os.environ.update(sc.get("env", {}))
        result = {}
        tr = Trainer.build(cfg, world)
        records = []  # the loop keeps no history: collect it here
        tr.callbacks.append(lambda _, record: records.append(record))
        if sc.get("perturb_weights"):
            precision_checks.perturb(tr, sc["perturb_weights"])
        watched = precision_checks.watch_one_step(tr, sc["watch_step"]) if sc.get("watch_step") else None
        if sc.get("unchanged_step"):
            watched = precision_checks.watch_unchanged(tr, sc["unchanged_step"])
        try:
            if sc.get("load"):
                result["loaded_iteration"] = checkpoint.load(tr, sc["load"])
            tr.train()
            if sc.get("save_final"):
                checkpoint.save(tr)
        except (StopTraining, checkpoint.CheckpointError) as e:
            result["error"] = f"{type(e).__name__}: {e}"
        except Exception:  # a test failure must show the traceback, and other scenarios still run
            result["error"] = traceback.format_exc()
            raise
        finally:
            tr.logger.close()
            for key in sc.get("env", {}):
                os.environ.pop(key, None)
        skipped = [r["iteration"] for r in records if r["skipped"]]
        every_rank = [None] * world
        dist.all_gather_object(every_rank, skipped)  # each rank's own decisions, to compare
        if watched is not None:
            result["watched_step"] = [None] * world
            dist.all_gather_object(result["watched_step"], watched)
        # (buckets the last backward launched itself, buckets) per rank: --overlap-grad-reduce did overlap
        result["buckets"] = [None] * world
        dist.all_gather_object(result["buckets"], [tr.optimizer.launched_in_backward, len(tr.optimizer.buckets)])
        if rank == 0:
            result.update(records=records, iteration=tr.iteration, consumed_samples=tr.consumed_samples,
                          skipped_per_rank=every_rank)
            (out / f"{sc['name']}.json").write_text(json.dumps(result))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    run(sys.argv[1])
