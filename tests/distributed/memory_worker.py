"""Measures what each rank really holds during one training iteration, next to the planner's
prediction for that rank (megallm.planner.predicted_rank_memory).

    torchrun --nproc-per-node N tests/distributed/memory_worker.py SPEC.json

SPEC: {"config": ..., "out": DIR, "scenarios": [{"name": ..., "overrides": {...}}, ...]}
Rank 0 writes DIR/<name>.json: {"ranks": [{"measured": {...}, "predicted": {...}}, ...]}.

Measured, by tensor storage (so views and shared buffers count once):
- parameters and model state after the step: weights, gradients (the fp32 main-grad buffer), the
  optimizer's per-parameter state and fp32 master copies (distributed optimizer: this rank's share).
- activations: the peak, over the pipeline schedule's whole forward/backward, of the bytes that
  autograd holds for backward (saved_tensors_hooks), parameters and buffers excluded. A saved
  tensor is released when autograd drops its graph node, which the hooks see through a holder
  object's finaliser.
"""

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megallm.planner import predicted_rank_memory  # noqa: E402
from megallm.planner.saved_tensors import SavedTensorMeter  # noqa: E402
from megallm.training.loop import Trainer  # noqa: E402
from tests.distributed.scenarios import each_scenario, load_spec  # noqa: E402


def storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if t is not None and t.dim() > 0:  # 0-dim tensors: Adam's step counters, not per-parameter state
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def measure(tr: Trainer) -> dict:
    params = tr.params
    exclude = {t.untyped_storage().data_ptr() for c in tr.chunks for t in [*c.parameters(), *c.buffers()]}
    meter = SavedTensorMeter(exclude)
    with meter.hooks():
        record = tr.train_step()
    assert meter.current == 0, f"{meter.current} saved bytes still held after backward"
    # main_grad: the fp32 flat grad buffer (p.grad is dropped by the accumulation hook)
    weights, grads = storage_bytes(params), storage_bytes(getattr(p, "main_grad", p.grad) for p in params)
    masters = storage_bytes(tr.optimizer.master_tensors())
    optim = storage_bytes(tr.optimizer.state_tensors())  # this rank's share under the distributed optimizer
    return {"parameters": sum(p.numel() for p in params), "weights": weights, "gradients": grads,
            "optimizer": optim, "master_weights": masters,
            "model_state_bytes": weights + grads + optim + masters,
            "activation_peak_bytes": meter.peak, **receive_buffers(tr), "loss": record["loss"]}


def receive_buffers(tr: Trainer) -> dict:
    """What the pipeline stages' per-micro-batch receive records (input, output gradient) hold
    after the step, and what they describe: torch alone would keep a buffer for every one."""
    infos = [info for stage in tr.runner.stages
             for per_micro_batch in (stage.args_recv_info, stage.grad_recv_info)
             for received in per_micro_batch.values() for info in received
             if not info.is_root_arg and info.tensor_meta is not None]
    expected = tr.runner.n_microbatches * sum((not st.is_first) + (not st.is_last) for st in tr.runner.stages)
    described = sum(math.prod(i.tensor_meta.shape) * i.tensor_meta.dtype.itemsize for i in infos)
    return {"receive_buffer_bytes": storage_bytes(info.buffer for info in infos), "receive_records": len(infos),
            "expected_receive_records": expected, "receive_bytes_described": described}


def run(spec_path: str) -> None:
    spec = load_spec(spec_path)
    world, rank = dist.get_world_size(), dist.get_rank()
    for sc, cfg in each_scenario(spec):
        tr = Trainer.build(cfg, world)
        mine = {"rank": rank, "measured": measure(tr), "predicted": predicted_rank_memory(cfg, world, rank)}
        tr.logger.close()
        every = [None] * world
        dist.all_gather_object(every, mine)
        if rank == 0:
            (Path(spec["out"]) / f"{sc['name']}.json").write_text(json.dumps({"ranks": every}, default=float))
        dist.barrier()
    dist.destroy_process_group()

if __name__ == "__main__":
    run(sys.argv[1])
