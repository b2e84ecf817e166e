"""Start-up of a launch, by part, then the spike detector's cost per iteration, in ONE launch.

    BENCH_LAUNCH_T0=<time.time() before torchrun> torchrun --nproc-per-node 8 bench/launch_worker.py SPEC.json

SPEC: {"config": YAML, "out": DIR, "overrides": {...}, "iters": N, "warmup": W}
Each rank writes DIR/launch_rank<r>.json:
  marks      wall-clock times (time.time(), comparable across processes) at the end of each start-up
             part: launch (torchrun called), worker_start (this script's first line), import_torch,
             import_megatron (megatron.core and megallm's training modules), init_process_group,
             model_parallel_groups, trainer_build, first_iteration;
  build      seconds inside Trainer.build: model chunks, weight init, pipeline warm-up step, datasets;
  spike      per-iteration records in two phases of N iterations (after W warm-up ones):
             'as_is' (the loop as it runs) and 'synced' (a barrier after the last collective
             before the check, outside its timer: a control, since the check itself holds no
             collective and so should bill no waiting for a late rank).
"""

import time

MARKS = {"worker_start": time.time()}

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

warnings.filterwarnings("ignore")

import torch  # noqa: E402, F401

MARKS["import_torch"] = time.time()

import megatron.core  # noqa: E402, F401
import torch.distributed as dist  # noqa: E402

from megallm.config import apply_overrides, load_yaml  # noqa: E402
from megallm.parallel import data_parallel  # noqa: E402
from megallm.parallel.topology import initialize_model_parallel  # noqa: E402
from megallm.training import loop  # noqa: E402

MARKS["import_megatron"] = time.time()


def accumulate_time(owner, name: str, seconds: dict, key: str) -> None:
    """Replace owner.name with a wrapper that adds its run time to seconds[key]."""
    inner = getattr(owner, name)

    def wrapped(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start

    setattr(owner, name, wrapped)


def synced_before_spike_check() -> None:
    """global_loss is the last collective before the detector's timer starts; a barrier at its
    end lines every rank up."""
    inner = data_parallel.global_loss

    def wrapped(*args, **kwargs):
        out = inner(*args, **kwargs)
        dist.barrier()
        return out

    data_parallel.global_loss = wrapped


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    MARKS["launch"] = float(os.environ.get("BENCH_LAUNCH_T0", MARKS["worker_start"]))
    dist.init_process_group("gloo")
    MARKS["init_process_group"] = time.time()
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = apply_overrides(load_yaml(spec["config"]), {"tensorboard": False, "eval_interval": 0,
                                                      "log_dir": str(Path(spec["out"]) / "logs"), **spec["overrides"]})
    p = cfg.parallel
    initialize_model_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                              p.virtual_pipeline_model_parallel_size)
    MARKS["model_parallel_groups"] = time.time()

    build = {}
    from megallm.data import dataset

    accumulate_time(loop, "build_model_chunks", build, "model_chunks")
    accumulate_time(loop.weight_mapping, "init_weights", build, "init_weights")
    accumulate_time(loop.PipelineRunner, "warmup", build, "pipeline_warmup_step")
    accumulate_time(dataset, "build_datasets", build, "datasets")
    tr = loop.Trainer.build(cfg, world)
    MARKS["trainer_build"] = time.time()
    tr.train_step()
    MARKS["first_iteration"] = time.time()

    spike = {}
    n = spec["warmup"] + spec["iters"]
    spike["as_is"] = [tr.train_step() for _ in range(n)][spec["warmup"]:]
    synced_before_spike_check()
    spike["synced"] = [tr.train_step() for _ in range(n)][spec["warmup"]:]
    tr.logger.close()
    keep = ("iteration", "elapsed_ms", "spike_check_ms", "tokens_per_sec", "loss", "skipped")
    result = {"rank": rank, "world_size": world, "marks": MARKS, "build": build,
              "spike": {k: [{f: r[f] for f in keep} for r in v] for k, v in spike.items()}}
    (Path(spec["out"]) / f"launch_rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
