"""Bytes sent per collective per rank in one training iteration, in ONE torchrun launch.

    torchrun --nproc-per-node 8 bench/comm_worker.py SPEC.json     (PYTHONPATH = the repository)

SPEC: {"config": YAML, "out": DIR, "scenarios": [{"name": ..., "path": "engine" | "ddp" | "ddp_zero",
       "overrides": {...}}, ...]}
engine: megallm's Trainer (its DistributedOptimizer). ddp / ddp_zero: the path megallm used before,
rebuilt here from torch's own classes over the same model chunks: DistributedDataParallel (fp32
all-reduce through DDP's default all-reduce comm hook, registered so the counting wrapper sees
it) with torch's AdamW, or with ZeroRedundancyOptimizer (which broadcasts each rank's updated fp32
parameters after the step). One unmeasured iteration runs first; the second is measured.
Rank 0 writes DIR/<name>.json: every rank's counts and the analytical figures for its layout.
"""

import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from megallm.config import apply_overrides, load_yaml, validate
from megallm.model import weight_mapping
from megallm.parallel.comm_stats import CommStats
from megallm.parallel.pipeline import PipelineRunner, build_model_chunks
from megallm.parallel.topology import initialize_model_parallel
from megallm.training.loop import Trainer, loss_fn

warnings.filterwarnings("ignore")


def _ps():
    from megatron.core import parallel_state

    return parallel_state


def analytical(cfg, chunks, world: int) -> dict:
    """Bandwidth-optimal bytes per rank per iteration for this rank's share of the layout."""
    ps = _ps()
    dp, tp = ps.get_data_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
    pp, vpp = cfg.parallel.pipeline_model_parallel_size, cfg.parallel.virtual_pipeline_model_parallel_size or 1
    params = sum(p.numel() for c in chunks for p in c.parameters())
    act = next(chunks[0].parameters()).element_size()
    t, h = cfg.training, cfg.model.hidden_size
    n_micro = cfg.num_micro_batches(world)
    tokens = t.micro_batch_size * t.seq_length
    out = {"params": params, "dp": dp, "tp": tp, "pp": pp, "param_bytes": act}
    frac = (dp - 1) / dp
    out["dp_all_reduce"] = 8 * params * frac
    out["dp_reduce_scatter"] = 4 * params * frac
    out["dp_all_gather"] = act * params * frac
    # tensor parallel without sequence parallelism: per layer, two row-parallel forward all-reduces
    # and two column-parallel backward all-reduces of [tokens, h]; the embedding's forward and the
    # output layer's backward one each; the vocab-parallel cross-entropy three fp32 [tokens] ones
    num_stages = pp * vpp
    all_reduces = sum(4 * len(c.layers) + c.pre_process + c.post_process for c in chunks)
    ce = sum(3 for c in chunks if c.post_process)
    out["tp_all_reduce"] = n_micro * (all_reduces * tokens * h * act + ce * tokens * 4) * 2 * (tp - 1) / tp
    # pipeline: each chunk sends its output forward (unless it is the last virtual stage) and
    # the gradient of its input backward (unless it is the first)
    stages = [v * pp + ps.get_pipeline_model_parallel_rank() for v in range(vpp)]
    sends = sum((s != num_stages - 1) + (s != 0) for s in stages) if pp > 1 else 0
    out["pp_send"] = n_micro * sends * tokens * h * act
    return out


def legacy_iteration(chunks, models, runner, optimizer, n_micro, tokens, labels) -> None:
    for c in chunks:
        for p in c.parameters():
            p.grad = None
    if runner.schedule is None:
        (model,) = models
        for i, (x, y) in enumerate(zip(tokens.chunk(n_micro), labels.chunk(n_micro))):
            ctx = model.no_sync() if i < n_micro - 1 else torch.enable_grad()
            with ctx:
                (loss_fn(model(x), y) / n_micro).backward()
    else:
        runner.step(tokens, labels)  # torch pipelining holds DDP in no_sync but for the last backward
    optimizer.step()


def run_legacy(cfg, world: int, zero: bool, stats: CommStats) -> list:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    ps, device = _ps(), torch.device("cpu")
    chunks = build_model_chunks(cfg, device)
    for c in chunks:
        weight_mapping.init_weights(c, cfg, ps.get_tensor_model_parallel_rank())
    group = ps.get_data_parallel_group()
    models = []
    for c in chunks:
        m = DistributedDataParallel(c, process_group=group, broadcast_buffers=False)
        m.register_comm_hook(group, allreduce_hook)
        models.append(m)
    n_micro = cfg.num_micro_batches(world)
    runner = PipelineRunner(models, cfg, n_micro, loss_fn, device)
    params = [p for c in chunks for p in c.parameters()]
    o = cfg.optimizer
    kwargs = dict(lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, weight_decay=o.weight_decay,
                  foreach=False)
    optimizer = (ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, process_group=group, **kwargs)
                 if zero else torch.optim.AdamW(params, **kwargs))
    t = cfg.training
    shape = (n_micro * t.micro_batch_size, t.seq_length)
    tokens = torch.randint(0, cfg.model.vocab_size, shape, generator=torch.Generator().manual_seed(0))
    for measured in (False, True):
        if measured:
            with stats:
                legacy_iteration(chunks, models, runner, optimizer, n_micro, tokens, tokens)
        else:
            legacy_iteration(chunks, models, runner, optimizer, n_micro, tokens, tokens)
    return chunks


def run_engine(cfg, world: int, stats: CommStats) -> list:
    tr = Trainer.build(cfg, world)
    tr.train_step()
    with stats:
        tr.train_step()
    tr.logger.close()
    return tr.chunks


def main(spec_path: str) -> None:
    dist.init_process_group("gloo")
    spec = json.loads(Path(spec_path).read_text())
    world, rank = dist.get_world_size(), dist.get_rank()
    for sc in spec["scenarios"]:
        cfg = apply_overrides(load_yaml(spec["config"]), {"tensorboard": False, "eval_interval": 0,
                                                          "log_dir": str(Path(spec["out"]) / sc["name"]),
                                                          **sc["overrides"]})
        errors = validate(cfg, world)
        assert not errors, errors
        p = cfg.parallel
        initialize_model_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                  p.virtual_pipeline_model_parallel_size)
        stats = CommStats()
        if sc["path"] == "engine":
            chunks = run_engine(cfg, world, stats)
        else:
            chunks = run_legacy(cfg, world, sc["path"] == "ddp_zero", stats)
        mine = {"rank": rank, "counts": stats.table(), "analytical": analytical(cfg, chunks, world)}
        every = [None] * world
        dist.all_gather_object(every, mine)
        if rank == 0:
            (Path(spec["out"]) / f"{sc['name']}.json").write_text(json.dumps({"ranks": every}))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
