"""Parallel sharded save: every rank writes what it owns, nobody gathers (format: format.py).

What a rank owns (no element is written twice):
- optimizer state: the ranges `sharded_state()` gives it (megallm.parallel.distributed_optimizer);
- weights: the same ranges of its tensor-parallel shard, so the writing of a replica's weights is
  spread over its data-parallel ranks exactly as the optimizer state is;
- parameters replicated across tensor parallelism (the norms): tensor-parallel rank 0 only.

    save(tr)  1. waits for the previous background write, if any        (collective: one barrier)
              2. snapshot: host copies of the owned pieces                (the only cost with --async-save)
              3. write model/ optim/ rng/ files, fsync, sha256 them read back from disk, leave done/rank_N.json
              4. rank 0: once all world_size markers are there, write meta.json, rename
                 iter_N.partial -> iter_N, replace `latest`, prune
Steps 3-4 run inline (blocking save, then a barrier) or on the background thread (--async-save).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megallm import __version__
from megallm.checkpoint import async_writer
from megallm.checkpoint.format import FORMAT, LATEST, complete_iterations, file_record, iter_dir, partial_dir, rank_file
from megallm.checkpoint.regions import part_rects, piece_view, range_pieces
from megallm.files import atomic_write
from megallm.model import weight_mapping as wm
from megallm.training import fault_injection as faults

OPTIM_KEY = "{key}/{state}"  # name of a piece's optimizer state inside optim/ files


def _ps():
    from megatron.core import parallel_state

    return parallel_state


def layout(cfg) -> dict:
    ps = _ps()
    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "vpp": cfg.parallel.virtual_pipeline_model_parallel_size, "dp": ps.get_data_parallel_world_size(),
            "world_size": dist.get_world_size(), "use_distributed_optimizer": cfg.parallel.use_distributed_optimizer}


def logical_shapes(cfg) -> dict[str, list[int]]:
    shapes = wm.logical_shapes(cfg)
    for layer in range(cfg.model.num_layers):
        shapes.update(wm.logical_shapes(cfg, layer))
    return {k: list(v) for k, v in shapes.items()}


# ----------------------------------------------------------------------------------------------
# Snapshot (main thread): host copies of what this rank owns


@dataclass
class Snapshot:
    root: Path
    iteration: int
    rank: int
    world_size: int
    model: dict[str, torch.Tensor] = field(default_factory=dict)  # tensor key -> box of a weight
    optim: dict[str, torch.Tensor] = field(default_factory=dict)  # OPTIM_KEY -> box of a state tensor
    pieces: list[dict] = field(default_factory=list)
    rng: dict = field(default_factory=dict)
    meta: Optional[dict] = None  # rank 0: meta.json without files and pieces
    keep: tuple[int, int, int] = (0, 0, 0)  # save_keep, spike_skip_window, iteration (pruning)
    timeout_s: float = 600.0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.model, self.optim) for t in d.values())


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state().tolist()}
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = [name, keys.tolist(), pos, has_gauss, gauss]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _host(t: torch.Tensor, copy: bool) -> torch.Tensor:
    # copy=True (async): training may change its tensors while the writer works. A blocking save
    # on CPU writes straight from the training tensors (safetensors writes from their memory).
    return t.detach().to("cpu", copy=copy).contiguous()


@torch.no_grad()
def snapshot(tr, copy: bool = True) -> Snapshot:
    ps, cfg, rank = _ps(), tr.cfg, dist.get_rank()
    tp_rank = ps.get_tensor_model_parallel_rank()
    tr.optimizer.finish_param_sync()  # --overlap-param-gather: the weights the last step made
    shards, scalars = tr.optimizer.sharded_state()
    rects = {id(p): (parts, part_rects(p, parts, cfg, tp_rank))
             for chunk in tr.chunks for _, p, parts in wm.local_parameters(chunk)}
    snap = Snapshot(Path(cfg.checkpoint.save), tr.iteration, rank, dist.get_world_size(), rng=_rng_state())
    model_file, optim_file = rank_file("model", rank), rank_file("optim", rank)
    for shard in shards:
        parts, part_boxes = rects[id(shard.param)]
        if parts[0].dim is None and tp_rank != 0:
            continue  # replicated over tensor parallelism: tp rank 0 writes it
        flat = shard.param.detach().view(-1)[shard.start:shard.end]
        for piece in range_pieces(shard.param, part_boxes, shard.start, shard.end):
            key = f"{piece.name}@{','.join(map(str, piece.logical_start))}"
            snap.model[key] = _host(piece_view(flat, piece), copy)
            entry = {"t": piece.name, "at": list(piece.logical_start), "shape": list(piece.shape),
                     "file": model_file, "key": key}
            for name, t in shard.tensors.items():
                snap.optim[OPTIM_KEY.format(key=key, state=name)] = _host(piece_view(t, piece).float(), copy)
                entry["optim"] = optim_file
            snap.pieces.append(entry)
    if rank == 0:
        snap.meta = {"format": FORMAT, "megallm_version": __version__, "iteration": tr.iteration,
                     "trainer": tr.state_dict(), "config": cfg.to_dict(), "layout": layout(cfg),
                     "optimizer": {"scalars": scalars, "keys": sorted({k for s in shards for k in s.tensors})},
                     "optim_key": OPTIM_KEY, "tensors": logical_shapes(cfg)}
        snap.keep = (cfg.checkpoint.save_keep, cfg.spike.spike_skip_window, tr.iteration)
    snap.timeout_s = 60.0 * cfg.parallel.distributed_timeout_minutes
    return snap


# ----------------------------------------------------------------------------------------------
# Write (inline or background thread): no collectives from here on


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write(snap: Snapshot) -> None:
    """Write and hash this rank's files, then leave its marker (rank 0: then commit). A failure
    leaves a .failed marker instead, so that rank 0 gives up at once rather than at the timeout."""
    done = partial_dir(snap.root, snap.iteration) / "done"
    try:
        _write_files(snap)
    except BaseException as e:
        done.mkdir(parents=True, exist_ok=True)
        (done / f"rank_{snap.rank:05d}.failed").write_text(f"{type(e).__name__}: {e}")
        raise
    if snap.rank == 0:
        commit(snap)


def _write_files(snap: Snapshot) -> None:
    partial = partial_dir(snap.root, snap.iteration)
    files = {}
    for kind, tensors in (("model", snap.model), ("optim", snap.optim)):
        if tensors:
            name = rank_file(kind, snap.rank)
            (partial / kind).mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(partial / name), metadata={"format": FORMAT})
            files[name] = partial / name
    name = rank_file("rng", snap.rank, "json")
    (partial / "rng").mkdir(parents=True, exist_ok=True)
    (partial / name).write_text(json.dumps(snap.rng))
    files[name] = partial / name
    faults.maybe_stall_in_write(snap.iteration)
    records = {}
    for name, path in files.items():
        _fsync(path)
        records[name] = file_record(path, snap.rank)  # hashed as read back: what the disk holds
    snap.model.clear()
    snap.optim.clear()  # the host copies go as soon as they are on disk
    (partial / "done").mkdir(exist_ok=True)
    atomic_write(partial / "done" / f"rank_{snap.rank:05d}.json", json.dumps({"files": records,
                                                                              "pieces": snap.pieces}))


def _wait_for_markers(done: Path, world_size: int, timeout_s: float) -> list[Path]:
    deadline = time.monotonic() + timeout_s
    while True:
        failed = sorted(done.glob("rank_*.failed"))
        if failed:
            raise RuntimeError(f"{failed[0]}: {failed[0].read_text()}")
        markers = sorted(done.glob("rank_*.json"))
        if len(markers) >= world_size:
            return markers
        if time.monotonic() > deadline:
            missing = sorted(set(range(world_size)) - {int(m.stem.split("_")[1]) for m in markers})
            raise TimeoutError(f"{done}: no marker from ranks {missing[:8]} after {timeout_s:.0f} s")
        time.sleep(0.02)


def commit(snap: Snapshot) -> Path:
    """Rank 0, after every rank has written and hashed its files: meta.json, rename, latest."""
    partial, final = partial_dir(snap.root, snap.iteration), iter_dir(snap.root, snap.iteration)
    files, pieces = {}, []
    for marker in _wait_for_markers(partial / "done", snap.world_size, snap.timeout_s):
        record = json.loads(marker.read_text())
        files.update(record["files"])
        pieces.extend(record["pieces"])
    for name, rec in files.items():  # a cheap last look: every file is there, at its size
        if (partial / name).stat().st_size != rec["bytes"]:
            raise RuntimeError(f"{partial / name}: size changed after rank {rec['writer_rank']} hashed it")
    faults.maybe_crash_in_save(snap.iteration)
    meta = dict(snap.meta, files=dict(sorted(files.items())), pieces=pieces)
    (partial / "meta.json").write_text(json.dumps(meta, separators=(",", ":")))
    _fsync(partial / "meta.json")
    shutil.rmtree(partial / "done")
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    atomic_write(snap.root / LATEST, str(snap.iteration))
    prune(snap.root, *snap.keep)
    print(f" saved checkpoint {final}", flush=True)
    return final


def prune(root: Path, keep_n: int, spike_skip_window: int, iteration: int) -> None:
    """Keep the newest save_keep checkpoints, and the newest one old enough to roll back to."""
    its = complete_iterations(root)
    if keep_n <= 0 or len(its) <= keep_n:
        return
    keep = set(its[-keep_n:])
    older = [i for i in its if i <= iteration - spike_skip_window]
    if older:
        keep.add(older[-1])
    for i in its:
        if i not in keep:
            shutil.rmtree(iter_dir(root, i), ignore_errors=True)


# ----------------------------------------------------------------------------------------------


def save(tr, async_save: Optional[bool] = None) -> Path:
    """Collective: every rank calls it at the same iteration. Returns the directory the checkpoint
    has (blocking) or will have (async) once committed."""
    cfg = tr.cfg
    async_save = cfg.checkpoint.async_save if async_save is None else async_save
    root = Path(cfg.checkpoint.save)
    async_writer.wait()  # the previous write first: one in flight at a time
    if dist.get_rank() == 0:
        shutil.rmtree(partial_dir(root, tr.iteration), ignore_errors=True)  # left by a killed save
        partial_dir(root, tr.iteration).mkdir(parents=True)
    dist.barrier()
    start = time.perf_counter()
    snap = snapshot(tr, copy=bool(async_save))
    stall, nbytes = time.perf_counter() - start, snap.nbytes()
    if async_save:
        async_writer.submit(lambda: write(snap), f"iteration {tr.iteration}")
    else:
        write(snap)
        dist.barrier()  # latest has moved when save returns, on every rank
    tr.logger.event("checkpoint", tr.iteration, path=str(iter_dir(root, tr.iteration)),
                    consumed_samples=tr.consumed_samples, async_save=bool(async_save),
                    snapshot_ms=round(stall * 1000.0, 3), snapshot_bytes=nbytes)
    return iter_dir(root, tr.iteration)


def wait_for_pending() -> Optional[str]:
    """Block until a background write is committed (or failed: returns the error)."""
    return async_writer.wait()


def due(cfg, iteration: int) -> bool:
    c = cfg.checkpoint
    return bool(c.save and c.save_interval and iteration % c.save_interval == 0)
