"""megallm-checkpoint-v1: read it as v2, and the old writer (kept for bench/checkpoint_bench.py and
tests/distributed/checkpoint_worker.py, which writes a v1 checkpoint for the v1-resume test).

v1 kept logical tensors whole, one file per layer (model/layer_00003.safetensors; optim/ the same
names with .exp_avg / .exp_avg_sq), written by one rank per pipeline stage after gathering its
stage over tensor parallelism and consolidating ZeRO's moments. A whole tensor is a box that starts
at zero, so a v1 checkpoint reads as a v2 one with one piece per tensor, indexed from the files'
safetensors headers (no tensor data is read for that); iteration, schedule and detector state move
from the top level of meta.json into "trainer". Nothing needs converting: --load takes v1
directories as they are.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megallm.checkpoint.format import LATEST, CheckpointError, file_record, iter_dir
from megallm.checkpoint.format import layer_file as file_of
from megallm.files import atomic_write
from megallm.model import weight_mapping as wm

FORMAT = "megallm-checkpoint-v1"
TRAINER_KEYS = ("iteration", "consumed_samples", "scheduler", "detector", "policy", "data_state")


def as_v2(ckpt: Path, meta: dict) -> dict:
    pieces, tensors = [], {}
    for name in sorted(meta["files"]):
        if not name.startswith("model/"):
            continue
        optim = "optim/" + name.split("/", 1)[1]
        try:
            with safe_open(str(ckpt / name), framework="pt") as f:
                for key in f.keys():
                    shape = list(f.get_slice(key).get_shape())
                    tensors[key] = shape
                    piece = {"t": key, "at": [0] * len(shape), "shape": shape, "file": name, "key": key}
                    if optim in meta["files"]:
                        piece["optim"] = optim
                    pieces.append(piece)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{ckpt / name}: unreadable header ({e})") from None
    out = {k: v for k, v in meta.items() if k not in TRAINER_KEYS + ("adam_step",)}
    out.update(iteration=meta.get("iteration", 0), pieces=pieces, tensors=tensors, optim_key="{key}.{state}",
               converted_from_format=FORMAT)
    if "scheduler" in meta:  # a training checkpoint (converted ones hold weights only)
        out["trainer"] = {k: meta[k] for k in TRAINER_KEYS if k in meta}
        keys = ["exp_avg", "exp_avg_sq"] if meta.get("adam_step") is not None else []
        out["optimizer"] = {"scalars": {"step": meta.get("adam_step")}, "keys": keys}
    return out


# ----------------------------------------------------------------------------------------------
# The v1 writer, as it was: gather each stage onto (tp 0, dp 0), write there. For the benchmark and
# the v1-resume test; the Adam moments come from the distributed optimizer's sharded_state().


def _ps():
    from megatron.core import parallel_state

    return parallel_state


def _adam_moments(optimizer) -> tuple[Callable[[torch.Tensor], dict[str, torch.Tensor]], bool, float]:
    """The Adam moments of whole local parameters, from the distributed optimizer's flat ranges.

    Returns moments(param) -> {"exp_avg", "exp_avg_sq"}: each a tensor of param's shape assembled
    from this rank's ranges and summed over the data-parallel group (the ranges are disjoint over
    it, so the sum is the whole), collective over that group and called for the same parameters
    in the same order on its ranks; whether any rank holds moments; and Adam's step."""
    shards, scalars = optimizer.sharded_state()
    by_param: dict[int, list] = {}
    for s in shards:
        by_param.setdefault(id(s.param), []).append(s)
    has_state = torch.tensor(1.0 if any("exp_avg" in s.tensors for s in shards) else 0.0)
    dist.all_reduce(has_state, op=dist.ReduceOp.MAX)  # a rank may hold no range at all
    dp_group = _ps().get_data_parallel_group()

    def moments(param: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for key in ("exp_avg", "exp_avg_sq"):
            flat = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
            for s in by_param.get(id(param), []):
                if key in s.tensors:
                    flat[s.start:s.end] = s.tensors[key].reshape(-1)
            dist.all_reduce(flat, group=dp_group)
            out[key] = flat.view(param.shape)
        return out

    return moments, has_state.item() > 0, float(scalars["step"])


def _gather_logical(chunks, cfg, optimizer) -> tuple[dict, dict, Optional[float]]:
    ps = _ps()
    tp_group, tp = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    writer = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    moments, has_state, step = _adam_moments(optimizer)
    model_files, optim_files = {}, {}

    def gather(t: torch.Tensor) -> list[torch.Tensor]:
        t = t.detach().float().contiguous()
        if tp == 1:
            return [t]
        out = [torch.empty_like(t) for _ in range(tp)]
        dist.all_gather(out, t, group=tp_group)
        return out

    for chunk in chunks:
        for _, param, parts in wm.local_parameters(chunk):
            logical = wm.to_logical(gather(param), parts, cfg)
            m1 = m2 = {}
            if has_state:
                state = moments(param)  # every data-parallel rank takes part; dp rank 0 keeps it
                if ps.get_data_parallel_rank() == 0:
                    m1 = wm.to_logical(gather(state["exp_avg"]), parts, cfg)
                    m2 = wm.to_logical(gather(state["exp_avg_sq"]), parts, cfg)
            if not writer:
                continue
            for key, t in logical.items():
                model_files.setdefault(file_of(key), {})[key] = t.cpu()
                if key in m1:
                    optim_files.setdefault(file_of(key), {})[key + ".exp_avg"] = m1[key].cpu()
                    optim_files[file_of(key)][key + ".exp_avg_sq"] = m2[key].cpu()
    return model_files, optim_files, step if has_state else None


def save_v1(tr, root: str | Path) -> tuple[Path, int]:
    """The v1 save (collective). Writes ROOT/iter_N in the old format; returns it and the bytes
    of the files this rank wrote."""
    from megallm.checkpoint.save import _rng_state, layout

    rank, root = dist.get_rank(), Path(root)
    final, partial = iter_dir(root, tr.iteration), Path(str(iter_dir(root, tr.iteration)) + ".partial")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        for sub in ("model", "optim", "rng"):
            (partial / sub).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    model_files, optim_files, step = _gather_logical(tr.chunks, tr.cfg, tr.optimizer)
    written = {}
    for sub, files in (("model", model_files), ("optim", optim_files)):
        for fname, tensors in files.items():
            save_file(tensors, str(partial / sub / fname), metadata={"format": FORMAT})
            written[f"{sub}/{fname}"] = partial / sub / fname
    rng_path = partial / "rng" / f"rank_{rank:05d}.json"
    rng_path.write_text(json.dumps(_rng_state()))
    written[f"rng/{rng_path.name}"] = rng_path
    hashes = {k: {kk: vv for kk, vv in file_record(p).items() if kk != "writer_rank"} for k, p in written.items()}
    all_hashes, steps = [None] * dist.get_world_size(), [None] * dist.get_world_size()
    dist.all_gather_object(all_hashes, hashes)
    dist.all_gather_object(steps, step)
    if rank == 0:
        files = {k: v for h in all_hashes for k, v in h.items()}
        meta = {"format": FORMAT, **tr.state_dict(), "adam_step": next((s for s in steps if s is not None), None),
                "config": tr.cfg.to_dict(), "layout": layout(tr.cfg), "files": files}
        (partial / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        atomic_write(root / LATEST, str(tr.iteration))
    dist.barrier()
    return final, sum(r["bytes"] for r in hashes.values())
