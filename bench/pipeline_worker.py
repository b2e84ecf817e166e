"""Pipeline-efficiency scenarios in ONE torchrun launch (start-up dominates on 2 CPU cores).

    torchrun --nproc-per-node P bench/pipeline_worker.py SPEC.json

SPEC: {"config": YAML, "out": DIR, "iters": N, "warmup": W, "repeats": R,
       "scenarios": [{"name": ..., "overrides": {...}}, ...]}

Per scenario, every rank records:
  - pipeline_s: the wall time of the pipeline step (forward + backward of all micro-batches),
    from a barrier before it to a barrier after it, so it is the slowest rank's time;
  - busy_s: this rank's CPU seconds inside that step (compute and copies, not waiting);
  - stage_s: the stage's compute measured ALONE: ranks take turns (the others wait at a barrier,
    asleep) running their chunks' forward + backward over the same micro-batches with no
    communication, median of R repeats. This is the "single-stage time" an ideal pipeline would
    take per stage if every stage had a core of its own.
Rank 0 writes DIR/<name>.json with every rank's figures.
"""

import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megallm.model import weight_mapping  # noqa: E402
from megallm.parallel.pipeline import build_model_chunks  # noqa: E402
from megallm.training.loop import Trainer, loss_fn  # noqa: E402
from tests.distributed.scenarios import each_scenario, load_spec  # noqa: E402


def timed_pipeline(tr: Trainer, sink: list) -> None:
    """Wrap tr.runner.step to append (wall seconds between barriers, this rank's CPU seconds)."""
    step = tr.runner.step

    def wrapped(tokens, labels):
        dist.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        out = step(tokens, labels)
        busy = time.process_time() - cpu
        dist.barrier()
        sink.append((time.perf_counter() - start, busy))
        return out

    tr.runner.step = wrapped


def stage_work(tr: Trainer, chunks: list) -> float:
    """Seconds for this rank's chunks to run forward + backward over one iteration's micro-batches,
    alone: inputs made beforehand, no sends or receives. `chunks` are fresh copies of the rank's
    chunks: the trained ones carry the optimizer's main-grad hooks and buffers."""
    cfg, m = tr.cfg, tr.runner.n_microbatches
    mb, s, h = cfg.training.micro_batch_size, cfg.training.seq_length, cfg.model.hidden_size
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (mb, s), generator=g)
    hidden = torch.randn(s, mb, h, generator=g)  # stage-to-stage tensors are [s, b, h], as in Megatron
    grad_out = torch.randn(s, mb, h, generator=g)
    start = time.perf_counter()
    for chunk in chunks:
        for _ in range(m):
            out = chunk(tokens if chunk.pre_process else hidden.clone().requires_grad_())
            if chunk.post_process:
                loss_fn(out, tokens).backward()
            else:
                out.backward(grad_out)
    seconds = time.perf_counter() - start
    for chunk in chunks:
        chunk.zero_grad(set_to_none=True)
    return seconds


def stage_alone(tr: Trainer, repeats: int) -> float:
    """Median of `repeats` stage_work runs, ranks taking turns while the others sleep at a barrier."""
    from megatron.core import parallel_state

    chunks = build_model_chunks(tr.cfg, tr.device)
    for chunk in chunks:
        weight_mapping.init_weights(chunk, tr.cfg, parallel_state.get_tensor_model_parallel_rank())
    rank, times = dist.get_rank(), []
    for turn in range(dist.get_world_size()):
        dist.barrier()
        if turn == rank:
            times = sorted(stage_work(tr, chunks) for _ in range(repeats))
        dist.barrier()
    return times[len(times) // 2]


def run(spec_path: str) -> None:
    spec = load_spec(spec_path)
    out = Path(spec["out"])
    world, rank = dist.get_world_size(), dist.get_rank()
    for sc, cfg in each_scenario(spec, defaults={"eval_interval": 0}):
        tr = Trainer.build(cfg, world)
        steps, elapsed = [], []
        timed_pipeline(tr, steps)
        for _ in range(spec["warmup"] + spec["iters"]):
            elapsed.append(tr.train_step()["elapsed_ms"] / 1e3)
        mine = {"rank": rank, "pipeline_s": [w for w, _ in steps[spec["warmup"]:]],
                "busy_s": [b for _, b in steps[spec["warmup"]:]], "iteration_s": elapsed[spec["warmup"]:],
                "stage_s": stage_alone(tr, spec["repeats"])}
        tr.logger.close()
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            result = {"name": sc["name"], "overrides": sc["overrides"], "world_size": world,
                      "num_micro_batches": tr.runner.n_microbatches, "ranks": gathered}
            (out / f"{sc['name']}.json").write_text(json.dumps(result))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    run(sys.argv[1])
