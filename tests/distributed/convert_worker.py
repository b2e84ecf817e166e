"""Loads converted checkpoints at several (tp, pp, vpp) layouts in ONE torchrun launch and writes
each layout's full logits for fixed tokens.

    torchrun --nproc-per-node 4 tests/distributed/convert_worker.py SPEC.json

SPEC: {"tokens": FILE.safetensors, "out": DIR, "runs": [{"name", "ckpt", "tp", "pp", "vpp"}, ...]}

Each run goes through the launcher's own path (Trainer.build, then checkpoint.load as
`--load` does), then one forward pass stage by stage: chunk v of pipeline rank r is virtual
stage v * pp + r, and the hidden state goes to the next stage with dist.send/recv along
megatron's pipeline group. The last stage all-gathers the vocab-parallel logits over the
tensor-parallel group; its (tp 0, dp 0) rank writes DIR/<name>.safetensors and DIR/<name>.json.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from megallm import checkpoint  # noqa: E402
from megallm.checkpoint.convert import config_from_meta, resolve_megallm  # noqa: E402
from megallm.config import apply_overrides  # noqa: E402
from megallm.training.loop import Trainer  # noqa: E402
from tests.distributed.scenarios import load_spec, set_up_layout  # noqa: E402


@torch.no_grad()
def pipelined_forward(chunks, cfg, tokens: torch.Tensor):
    """Full logits [b, s, vocab] on last-stage ranks, None elsewhere."""
    from megatron.core import parallel_state as ps

    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    num_stages = pp * len(chunks)
    hidden_shape = (tokens.shape[1], tokens.shape[0], cfg.model.hidden_size)  # [s, b, h] between stages
    out = None
    for stage in range(num_stages):
        if stage % pp != pp_rank:
            continue
        if stage == 0:
            x = tokens
        else:
            x = torch.empty(hidden_shape)
            dist.recv(x, src=ps.get_pipeline_model_parallel_prev_rank())
        out = chunks[stage // pp](x)
        if stage < num_stages - 1:
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
    if pp_rank != pp - 1:
        return None
    tp_group = ps.get_tensor_model_parallel_group()
    pieces = [torch.empty_like(out) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(pieces, out.contiguous(), group=tp_group)
    return torch.cat(pieces, dim=-1)[..., : cfg.model.vocab_size]


def run(spec_path: str) -> None:
    from megatron.core import parallel_state as ps

    spec = load_spec(spec_path)
    out = Path(spec["out"])
    tokens = load_file(spec["tokens"])["tokens"]
    world = dist.get_world_size()
    for run in spec["runs"]:
        ckpt = resolve_megallm(run["ckpt"])
        cfg = config_from_meta(checkpoint.read_meta(ckpt), str(ckpt))
        cfg = apply_overrides(cfg, {
            "tp": run["tp"], "pp": run["pp"], "vpp": run.get("vpp"), "seq_length": tokens.shape[1],
            "micro_batch_size": 1, "global_batch_size": 8, "train_iters": 1, "lr_warmup_iters": 0,
            "tensorboard": False, "log_dir": str(out / run["name"]), "load": run["ckpt"], "save": None})
        set_up_layout(cfg)
        tr = Trainer.build(cfg, world)
        loaded = checkpoint.load(tr, cfg.checkpoint.load)
        logits = pipelined_forward(tr.chunks, cfg, tokens)
        tr.logger.close()
        if logits is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
            save_file({"logits": logits.contiguous()}, str(out / f"{run['name']}.safetensors"))
            (out / f"{run['name']}.json").write_text(json.dumps({
                "loaded_iteration": loaded, "iteration": tr.iteration, "optimizer_state": len(tr.optimizer.state),
                "layers": [c.layer_numbers for c in tr.chunks]}))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    run(sys.argv[1])
