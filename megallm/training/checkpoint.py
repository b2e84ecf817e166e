"""Checkpoints that survive kills, corruption and layout changes.

Layout on disk (nothing in it is pickled: loading can never run code):

    SAVE/latest_checkpointed_iteration.txt      newest complete iteration, written last
    SAVE/iter_0000050/
        meta.json                               iteration, consumed samples, scheduler, spike
                                                detector and skip history, resolved config, layout,
                                                megallm version, and size + sha256 of every file
        model/embedding.safetensors             logical (unsharded, HuggingFace-named) weights:
        model/layer_00000.safetensors ...       one file per decoder layer, so any (tp, pp, vpp)
        model/head.safetensors                  layout reads exactly the layers it owns
        optim/<same names>.safetensors          Adam moments, logical like the weights
        rng/rank_00000.json                     python, numpy and torch RNG states per rank

A checkpoint is written into `iter_N.partial/` and renamed to `iter_N/` only when every rank has
finished, then the `latest` file is replaced atomically: a run killed mid-save leaves the previous
checkpoint as latest. The data-parallel size may change on resume too (ZeRO-1 shards are
re-cut from the logical moments); only the model shape may not.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from megallm import __version__
from megallm.files import atomic_write
from megallm.model import weight_mapping as wm
from megallm.training import fault_injection as faults

LATEST = "latest_checkpointed_iteration.txt"
FORMAT = "megallm-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def _ps():
    from megatron.core import parallel_state

    return parallel_state


def iter_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def file_of(logical_name: str) -> str:
    """Which file of model/ or optim/ holds a logical tensor."""
    if logical_name.startswith("model.layers."):
        return f"layer_{int(logical_name.split('.')[2]):05d}.safetensors"
    return "embedding.safetensors" if logical_name == "model.embed_tokens.weight" else "head.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_record(path: Path) -> dict:
    """What meta.json keeps of each file, for `verify_files` to check on load."""
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


# ----------------------------------------------------------------------------------------------
# Gathering logical tensors (collective over the tensor- and data-parallel groups)


def _adam_moments(optimizer) -> dict[int, dict]:
    """id(param) -> {"exp_avg", "exp_avg_sq", "step"} (and "main_param", the fp32 master, under
    bf16) for every parameter of this model-parallel rank, on data-parallel rank 0: each rank's
    ranges from the optimizer's sharded_state, summed over data parallel (the ranges are
    disjoint, so the sum assembles them)."""
    shards, scalars = optimizer.sharded_state()
    if scalars["step"] == 0 and not optimizer.main_params_are_copies:
        return {}
    keys = (["exp_avg", "exp_avg_sq"] if scalars["step"] > 0 else []) + (
        ["main_param"] if optimizer.main_params_are_copies else [])
    mine: dict[int, list] = {}
    for shard in shards:
        mine.setdefault(id(shard.param), []).append(shard)
    group, out = _ps().get_data_parallel_group(), {}
    for p in optimizer.params:
        state = {"step": scalars["step"]} if scalars["step"] > 0 else {}
        for key in keys:
            full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
            for shard in mine.get(id(p), []):
                full[shard.start:shard.end] = shard.tensors[key]
            dist.all_reduce(full, group=group)
            state[key] = full.view_as(p)
        out[id(p)] = state
    return out if _ps().get_data_parallel_rank() == 0 else {}


def _gather_logical(chunks, cfg, moments: dict[int, dict]) -> tuple[dict, dict, Optional[float]]:
    """Logical model tensors and Adam moments, grouped by file, on the writer rank (tp 0, dp 0)."""
    ps = _ps()
    tp_group, tp = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    writer = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    has_state = torch.tensor(1.0 if any("exp_avg" in m for m in moments.values()) else 0.0)
    dist.all_reduce(has_state, op=dist.ReduceOp.MAX, group=tp_group)
    model_files, optim_files, step = {}, {}, None

    def gather(t: torch.Tensor) -> list[torch.Tensor]:
        t = t.detach().float().contiguous()
        if tp == 1:
            return [t]
        out = [torch.empty_like(t) for _ in range(tp)]
        dist.all_gather(out, t, group=tp_group)
        return out

    for chunk in chunks:
        for name, param, parts in wm.local_parameters(chunk):
            state = moments.get(id(param))
            # under bf16 the fp32 master is the checkpoint's weight (the bf16 copy is rounded)
            logical = wm.to_logical(gather(state["main_param"] if state and "main_param" in state else param),
                                    parts, cfg)
            if state is not None and "exp_avg" not in state:
                state = None
            if has_state.item() > 0 and ps.get_data_parallel_rank() == 0:
                # Every tp rank of dp rank 0 joins the gather; a rank without state for this
                # parameter (no step taken yet) sends zeros.
                avg = state["exp_avg"] if state else torch.zeros_like(param)
                sq = state["exp_avg_sq"] if state else torch.zeros_like(param)
                m1, m2 = wm.to_logical(gather(avg), parts, cfg), wm.to_logical(gather(sq), parts, cfg)
                if state:
                    step = float(state["step"])
            else:
                m1 = m2 = {}
            if not writer:
                continue
            for key, t in logical.items():
                model_files.setdefault(file_of(key), {})[key] = t.cpu()
                if key in m1:
                    optim_files.setdefault(file_of(key), {})[key + ".exp_avg"] = m1[key].cpu()
                    optim_files[file_of(key)][key + ".exp_avg_sq"] = m2[key].cpu()
    return model_files, optim_files, step


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state().tolist()}
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = [name, keys.tolist(), pos, has_gauss, gauss]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


# ----------------------------------------------------------------------------------------------
# Save


def save(tr) -> Path:
    """Collective: every rank calls it at the same iteration."""
    cfg, rank = tr.cfg, dist.get_rank()
    root = Path(cfg.checkpoint.save)
    final, partial = iter_dir(root, tr.iteration), Path(str(iter_dir(root, tr.iteration)) + ".partial")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        for sub in ("model", "optim", "rng"):
            (partial / sub).mkdir(parents=True, exist_ok=True)
    dist.barrier()

    model_files, optim_files, step = _gather_logical(tr.chunks, cfg, _adam_moments(tr.optimizer))
    written = {}
    for sub, files in (("model", model_files), ("optim", optim_files)):
        for fname, tensors in files.items():
            path = partial / sub / fname
            save_file(tensors, str(path), metadata={"format": FORMAT})
            written[f"{sub}/{fname}"] = path
    rng_path = partial / "rng" / f"rank_{rank:05d}.json"
    rng_path.write_text(json.dumps(_rng_state()))
    written[f"rng/{rng_path.name}"] = rng_path
    hashes = {k: file_record(p) for k, p in written.items()}
    steps = [None] * dist.get_world_size()
    all_hashes = [None] * dist.get_world_size()
    dist.all_gather_object(all_hashes, hashes)
    dist.all_gather_object(steps, step)

    faults.maybe_crash_in_save(tr.iteration)
    if rank == 0:
        files = {k: v for h in all_hashes for k, v in h.items()}
        step = next((s for s in steps if s is not None), None)
        meta = checkpoint_meta(tr, files, step)
        (partial / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        atomic_write(root / LATEST, str(tr.iteration))
        _prune(tr, root)
        print(f" saved checkpoint {final}", flush=True)
    dist.barrier()
    tr.logger.event("checkpoint", tr.iteration, path=str(final), consumed_samples=tr.consumed_samples)
    return final


def checkpoint_meta(tr, files: dict, adam_step: Optional[float]) -> dict:
    ps = _ps()
    return {
        "format": FORMAT, "megallm_version": __version__, "iteration": tr.iteration,
        "consumed_samples": tr.consumed_samples, "adam_step": adam_step,
        "scheduler": tr.scheduler.state_dict(), "detector": tr.detector.state_dict(),
        "policy": tr.policy.state_dict(), "config": tr.cfg.to_dict(), "data_state": _data_state(tr),
        "layout": {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
                   "vpp": tr.cfg.parallel.virtual_pipeline_model_parallel_size,
                   "dp": ps.get_data_parallel_world_size(), "world_size": dist.get_world_size(),
                   "use_distributed_optimizer": tr.cfg.parallel.use_distributed_optimizer},
        "files": files,
    }


def _data_state(tr) -> Optional[dict]:
    """Where each dataset of the blend stands, so a resume with another --data-path replays nothing."""
    if not tr.cfg.data.data_path:
        return None
    from megallm.data.blend import data_state

    return data_state(tr.train_ds, tr.cfg.data.data_path, tr.consumed_samples, tr.exclude)


def resume_data_state(path: str | Path) -> Optional[dict]:
    """The data state of the checkpoint `load` would pick first (datasets are built before loading)."""
    candidates = load_candidates(path)
    if not candidates:
        return None
    try:
        return read_meta(candidates[0]).get("data_state")
    except CheckpointError:
        return None


def complete_iterations(root: str | Path) -> list[int]:
    """Iterations of complete checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    its = []
    for d in root.glob("iter_*"):
        if d.is_dir() and not d.name.endswith(".partial") and (d / "meta.json").exists():
            its.append(int(d.name.split("_")[1]))
    return sorted(its)


def _prune(tr, root: Path) -> None:
    """Keep the newest save_keep checkpoints, and the newest one old enough to roll back to."""
    keep_n = tr.cfg.checkpoint.save_keep
    its = complete_iterations(root)
    if keep_n <= 0 or len(its) <= keep_n:
        return
    keep = set(its[-keep_n:])
    horizon = tr.iteration - tr.cfg.spike.spike_skip_window
    older = [i for i in its if i <= horizon]
    if older:
        keep.add(older[-1])
    for i in its:
        if i not in keep:
            shutil.rmtree(iter_dir(root, i), ignore_errors=True)


def maybe_save(tr) -> bool:
    """Save at save_interval and, after a signal on any rank, now. Returns whether it saved."""
    from megallm.parallel.data_parallel import any_rank

    tr.stop_requested = any_rank(tr.stop_requested, tr.device)
    c = tr.cfg.checkpoint
    if c.save and c.save_interval and tr.iteration % c.save_interval == 0:
        save(tr)
        return True
    return False


# ----------------------------------------------------------------------------------------------
# Load


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable or truncated ({e})") from None


def verify_files(ckpt: Path, meta: dict, names: list[str]) -> None:
    for name in names:
        path, expected = ckpt / name, meta["files"].get(name)
        if expected is None or not path.exists():
            raise CheckpointError(f"{path}: missing")
        if path.stat().st_size != expected["bytes"]:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, expected {expected['bytes']} (truncated?)")
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path}: checksum mismatch (corrupted)")


def read_meta(ckpt: Path) -> dict:
    path = ckpt / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a complete checkpoint)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def model_files_of(chunks) -> list[str]:
    names = set()
    for chunk in chunks:
        for _, _, parts in wm.local_parameters(chunk):
            names.update(file_of(p.logical) for p in parts)
    return sorted(names)


def load_model_weights(chunks, cfg, ckpt: str | Path, tp_rank: int) -> dict:
    """Fill model chunks (any layout) from a checkpoint directory's logical weights; returns its meta.
    Used by resume, by the HuggingFace converter's checks, and by evaluation tools."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    files = model_files_of(chunks)
    verify_files(ckpt, meta, [f"model/{f}" for f in files])
    model = {}
    for f in files:
        model.update(_read(ckpt / "model" / f))
    for chunk in chunks:
        wm.load_logical(chunk, lambda n: _tensor(model, n, ckpt), cfg, tp_rank)
    return meta


def is_model_only(meta: dict) -> bool:
    """Converted checkpoints (tools/convert_checkpoint.py) hold weights only: optimizer, schedule
    and spike detector start fresh."""
    return "scheduler" not in meta


def _load_from(tr, ckpt: Path, load_optimizer: bool = True) -> dict:
    meta = load_model_weights(tr.chunks, tr.cfg, ckpt, _ps().get_tensor_model_parallel_rank())
    tr.optimizer.reload_masters_from_params()  # bf16 masters: replaced below when the optimizer state loads
    files = model_files_of(tr.chunks)
    optim_files = [f"optim/{f}" for f in files if f"optim/{f}" in meta["files"]] if load_optimizer else []
    rng_name = f"rng/rank_{dist.get_rank():05d}.json"
    verify_files(ckpt, meta, optim_files)
    if optim_files:
        moments = {}
        for f in optim_files:
            moments.update(_read(ckpt / f))
        _load_optimizer(tr, moments, meta["adam_step"], ckpt)
    if rng_name in meta["files"] and load_optimizer:
        verify_files(ckpt, meta, [rng_name])
        _set_rng_state(json.loads((ckpt / rng_name).read_text()))
    return meta


def _warn_model_differences(meta: dict, cfg, ckpt: Path) -> None:
    """Shapes are checked tensor by tensor; settings without a shape (rotary base, norm epsilon)
    would load silently into a different model."""
    saved = meta.get("config", {}).get("model", {})
    now = cfg.to_dict()["model"]
    diffs = [f"{k}: checkpoint {saved[k]!r}, run {now[k]!r}" for k in now if k in saved and saved[k] != now[k]]
    if diffs and dist.get_rank() == 0:
        print(f" warning: {ckpt} was saved with a different model config: " + "; ".join(diffs), flush=True)


def _tensor(tensors: dict, name: str, ckpt: Path) -> torch.Tensor:
    if name not in tensors:
        raise CheckpointError(f"{ckpt / 'model' / file_of(name)}: no tensor '{name}'")
    return tensors[name]


def _load_optimizer(tr, moments: dict, step: float, ckpt: Path) -> None:
    """Hand the optimizer, through its sharded-state contract, the ranges it holds of this
    model-parallel rank's moments (and, under bf16, of the fp32 weights as its masters)."""
    tp_rank = _ps().get_tensor_model_parallel_rank()
    names = {id(param): parts for chunk in tr.chunks for _, param, parts in wm.local_parameters(chunk)}
    model = {}
    if tr.optimizer.main_params_are_copies:
        for f in model_files_of(tr.chunks):
            model.update(_read(ckpt / "model" / f))
    cache: dict[tuple[int, str], torch.Tensor] = {}

    def local(param, suffix: str, tensors: dict, sub: str) -> torch.Tensor:
        pieces = []
        for p in names[id(param)]:
            key = p.logical + suffix
            if key not in tensors:
                raise CheckpointError(f"{ckpt / sub / file_of(p.logical)}: no tensor '{key}'")
            t = tensors[key]
            pieces.append(wm.pad_vocab(t, tr.cfg.padded_vocab_size) if p.logical in wm.VOCAB_TENSORS else t)
        return wm.shard(pieces, [p.dim for p in names[id(param)]], tp_rank, tr.cfg.parallel.tensor_model_parallel_size)

    def read(param, start: int, end: int, key: str) -> torch.Tensor:
        if (id(param), key) not in cache:
            cache[(id(param), key)] = (local(param, "", model, "model") if key == "main_param"
                                       else local(param, "." + key, moments, "optim")).float().reshape(-1)
        return cache[(id(param), key)][start:end]

    tr.optimizer.load_sharded_state(read, {"step": int(step or 0)})


def _apply_meta(tr, meta: dict) -> None:
    if is_model_only(meta):
        tr.iteration = meta.get("iteration", 0) if tr.cfg.checkpoint.keep_iteration else 0
        return
    tr.iteration = meta["iteration"]
    tr.consumed_samples = meta["consumed_samples"]
    tr.scheduler.load_state_dict(meta["scheduler"])
    tr.scheduler.step(increment=0)  # re-applies the restored learning rate to the param groups
    tr.detector.load_state_dict(meta["detector"])
    tr.policy.load_state_dict(meta["policy"])


def load_candidates(path: str | Path, before_iteration: Optional[int] = None) -> list[Path]:
    """The checkpoints `load` tries, in order: `path` itself when it is one iter_N directory, else
    the run directory's complete checkpoints (before `before_iteration`), newest first."""
    path = Path(path)
    if (path / "meta.json").exists() or path.name.startswith("iter_"):
        return [path]
    its = [i for i in complete_iterations(path) if before_iteration is None or i < before_iteration]
    return [iter_dir(path, i) for i in reversed(its)]


def load(tr, path: str | Path, before_iteration: Optional[int] = None) -> Optional[int]:
    """Resume from `path`: a run directory (its newest complete checkpoint, falling back to older
    ones if that one is damaged) or one iter_N directory. Returns the iteration loaded, or None
    when the directory holds no checkpoint (a fresh start)."""
    from megallm.parallel.data_parallel import any_rank

    candidates = load_candidates(path, before_iteration)
    if not candidates:
        if before_iteration is None:
            return None
        raise CheckpointError(f"{path}: no complete checkpoint before iteration {before_iteration}")
    errors = []
    for ckpt in candidates:
        try:
            error, meta = None, _load_from(tr, ckpt)
        except CheckpointError as e:
            error, meta = str(e), None
        if not any_rank(error is not None, tr.device):
            same_layout = meta.get("layout", {}).get("world_size") == dist.get_world_size()
            _apply_meta(tr, meta)
            _warn_model_differences(meta, tr.cfg, ckpt)
            if not same_layout and not is_model_only(meta) and dist.get_rank() == 0:
                print(f" note: {ckpt} was written by {meta['layout']}; RNG states are restored per rank only "
                      "where the rank existed", flush=True)
            if errors and dist.get_rank() == 0:
                print(f" warning: fell back to {ckpt} because " + "; ".join(errors), flush=True)
            return meta["iteration"]
        msgs = [None] * dist.get_world_size()
        dist.all_gather_object(msgs, error)
        errors.append("; ".join(sorted({m for m in msgs if m})))
        if dist.get_rank() == 0:
            print(f" warning: checkpoint {ckpt} is damaged: {errors[-1]}", flush=True)
    raise CheckpointError(f"{path}: no usable checkpoint: " + " | ".join(errors))


# ----------------------------------------------------------------------------------------------
# Rollback and signals


def rollback(tr) -> None:
    """Reload the newest checkpoint from before the first of the recent spikes and move the data
    past the bad window (PaLM's recipe)."""
    from megallm.training.loop import StopTraining

    spikes = tr.policy.recent_spikes(tr.iteration)
    rollbacks = list(tr.policy.rollbacks)
    if len(rollbacks) >= tr.policy.max_rollbacks:
        raise StopTraining(
            f"loss spikes persist after {len(rollbacks)} rollbacks (spike_max_rollbacks): spikes at iterations "
            f"{spikes}, samples up to {tr.consumed_samples}; see spikes.jsonl and run tools/spike_report.py")
    consumed_after = tr.consumed_samples + tr.cfg.spike.spike_rollback_skip_samples
    iteration_before = tr.iteration
    to = load(tr, tr.cfg.checkpoint.save, before_iteration=min(spikes))
    tr.policy.rollbacks = rollbacks  # the checkpoint predates them; the count must survive
    consumed_before = tr.consumed_samples
    tr.consumed_samples = consumed_after
    tr.policy.record_rollback(iteration_before, to, spikes)
    tr.logger.event("rollback", iteration_before, to_iteration=to, checkpoint=str(iter_dir(tr.cfg.checkpoint.save, to)),
                    spike_iterations=spikes, consumed_samples_before=consumed_before,
                    consumed_samples_after=consumed_after)
    if dist.get_rank() == 0:
        print(f" rollback: spikes at {spikes}; reloaded iteration {to}, data moved to sample {consumed_after}",
              flush=True)


def install_signal_handlers(tr) -> None:
    """SIGTERM/SIGINT (a scheduler's preemption): checkpoint at the next iteration boundary and exit
    0; a second signal exits at once."""

    def handler(signum, frame):
        if tr.stop_requested:
            print(f" second signal {signum}: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        tr.stop_requested = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
