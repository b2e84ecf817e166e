"""Checkpoint scenarios in ONE torchrun launch: train_worker's scenarios plus two checkpoint hooks.

    torchrun --nproc-per-node N tests/distributed/checkpoint_worker.py SPEC.json

Scenario keys beyond train_worker's: "save_v1": [ROOT, ITERATION] writes a v1 checkpoint (the old
writer) at that iteration; "load": DIR. Rank 0 writes DIR/<name>.json with the records.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from megallm import checkpoint
from megallm.checkpoint import v1
from megallm.training.loop import Trainer
from tests.distributed.scenarios import each_scenario, load_spec


def run(spec_path: str) -> None:
    spec = load_spec(spec_path)
    out = Path(spec["out"])
    for sc, cfg in each_scenario(spec, spec.get("defaults")):
        result = {}
        tr = Trainer.build(cfg, dist.get_world_size())
        records = []
        tr.callbacks.append(lambda _, record: records.append(record))
        if sc.get("save_v1"):
            root, at = sc["save_v1"]
            tr.callbacks.append(lambda t, record: v1.save_v1(t, root) if t.iteration == at else None)
        try:
            if sc.get("load"):
                result["loaded_iteration"] = checkpoint.load(tr, sc["load"])
            tr.train()
        except checkpoint.CheckpointError as e:
            result["error"] = f"CheckpointError: {e}"
        finally:
            tr.logger.close()
        if dist.get_rank() == 0:
            result.update(records=records, iteration=tr.iteration)
            (out / f"{sc['name']}.json").write_text(json.dumps(result))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    run(sys.argv[1])
