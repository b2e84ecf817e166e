"""Layout-free load: every rank reads only the boxes of logical tensors it needs.

A rank needs, for each local parameter, its whole tensor-parallel shard (weights) and the flat
ranges its optimizer asks for (`load_sharded_state(read, scalars)`). Each is turned into boxes of
logical tensors (regions.py); each box is filled from the stored pieces that intersect it, read
with safetensors' `get_slice` (only those bytes). A file is checked (size and sha256 against
meta.json) before its first read, so corruption is named with the file and the rank that wrote
it, and the load falls back to the previous checkpoint on every rank alike.

The checkpoint is chosen once: `load` picks the newest usable candidate, and the trainer's state
from that same checkpoint (data state included) is what the datasets are then built from.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

from megallm.checkpoint import async_writer, v1
from megallm.checkpoint.format import FORMAT, CheckpointError, is_model_only, load_candidates, verify_files
from megallm.checkpoint.regions import intersect, part_rects, piece_view, range_pieces, slices
from megallm.model import weight_mapping as wm


def _ps():
    from megatron.core import parallel_state

    return parallel_state


def read_meta(ckpt: Path) -> dict:
    """meta.json of a checkpoint directory; a v1 one is indexed as v2 (megallm.checkpoint.v1)."""
    path = Path(ckpt) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a complete checkpoint)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if meta.get("format") == v1.FORMAT:
        return v1.as_v2(Path(ckpt), meta)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r} (or {v1.FORMAT!r})")
    return meta


class PieceReader:
    """Boxes of logical tensors from a checkpoint's pieces, each file verified before its first read."""

    def __init__(self, ckpt: Path, meta: dict):
        self.ckpt, self.meta = Path(ckpt), meta
        self.by_name: dict[str, list[dict]] = {}
        for piece in meta["pieces"]:
            self.by_name.setdefault(piece["t"], []).append(piece)
        self.optim_key = meta.get("optim_key", "{key}/{state}")
        self.states = set(meta.get("optimizer", {}).get("keys", []))
        self._open: dict[str, object] = {}
        self.bytes_read = 0

    def _file(self, name: str):
        if name not in self._open:
            verify_files(self.ckpt, self.meta, [name])
            try:
                self._open[name] = safe_open(str(self.ckpt / name), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{self.ckpt / name}: unreadable ({e})") from None
        return self._open[name]

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        saved = self.meta.get("tensors", {}).get(name)
        if saved is not None and tuple(saved) != tuple(shape):
            raise CheckpointError(f"{self.ckpt / 'meta.json'}: '{name}' has shape {tuple(saved)}, this model's is "
                                  f"{tuple(shape)} (a checkpoint of another model size?)")

    def read(self, name: str, start: tuple[int, ...], shape: tuple[int, ...], state: str = "param") -> torch.Tensor:
        """The box (start, shape) of logical tensor `name`: its weights (state "param") or an optimizer
        state ("exp_avg", "exp_avg_sq", "main_param"; fp32 weights stand in for absent masters)."""
        if state == "main_param" and "main_param" not in self.states:
            state = "param"
        out = torch.empty(shape, dtype=torch.float32)
        covered = 0
        for piece in self.by_name.get(name, []):
            box = intersect((start, shape), (tuple(piece["at"]), tuple(piece["shape"])))
            if box is None:
                continue
            if state == "param":
                f, key = self._file(piece["file"]), piece["key"]
            elif "optim" in piece:
                f, key = self._file(piece["optim"]), self.optim_key.format(key=piece["key"], state=state)
            else:
                continue
            try:
                data = f.get_slice(key)[slices(box, tuple(piece["at"]))]
            except (SafetensorError, KeyError) as e:
                where = piece["file"] if state == "param" else piece["optim"]
                raise CheckpointError(f"{self.ckpt / where}: no tensor '{key}' ({e})") from None
            out[slices(box, start)] = data.to(torch.float32)
            covered += math.prod(box[1])
            self.bytes_read += data.numel() * data.element_size()
        if covered != math.prod(shape):
            raise CheckpointError(f"{self.ckpt}: {state} of '{name}' at {list(start)} {list(shape)} is not fully "
                                  f"stored ({covered} of {math.prod(shape)} elements)")
        return out


class RangeReader:
    """read(param, start, end, state) over local parameters: the optimizer contract's reader."""

    def __init__(self, reader: PieceReader, chunks, cfg, tp_rank: int):
        self.reader = reader
        self.rects = {}
        for chunk in chunks:
            for _, p, parts in wm.local_parameters(chunk):
                self.rects[id(p)] = part_rects(p, parts, cfg, tp_rank)

    def __call__(self, param, start: int, end: int, state: str) -> torch.Tensor:
        out = torch.zeros(end - start, dtype=torch.float32)  # padded vocabulary rows stay zero
        for piece in range_pieces(param, self.rects[id(param)], start, end):
            piece_view(out, piece).copy_(self.reader.read(piece.name, piece.logical_start, piece.shape, state))
        return out


@torch.no_grad()
def load_model_weights(chunks, cfg, ckpt: str | Path, tp_rank: int, reader: Optional[PieceReader] = None) -> dict:
    """Fill model chunks (any layout) from a checkpoint's weights; returns its meta. Used by
    resume, by the HuggingFace converter's checks and by evaluation tools."""
    reader = reader or PieceReader(Path(ckpt), read_meta(Path(ckpt)))
    shapes = wm.logical_shapes(cfg)
    for chunk in chunks:
        for layer in chunk.layer_numbers:
            shapes.update(wm.logical_shapes(cfg, layer))
    for chunk in chunks:
        for _, _, parts in wm.local_parameters(chunk):
            for part in parts:
                reader.check_shape(part.logical, shapes[part.logical])
    read = RangeReader(reader, chunks, cfg, tp_rank)
    for chunk in chunks:
        for _, p, _ in wm.local_parameters(chunk):
            p.copy_(read(p, 0, p.numel(), "param").view_as(p))
    return reader.meta


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _load_from(tr, ckpt: Path) -> dict:
    """Weights, optimizer state and this rank's RNG into tr's modules (not yet its own progress)."""
    ps = _ps()
    tp_rank = ps.get_tensor_model_parallel_rank()
    meta = read_meta(ckpt)
    pieces = PieceReader(ckpt, meta)
    load_model_weights(tr.chunks, tr.cfg, ckpt, tp_rank, pieces)
    tr.optimizer.reload_masters_from_params()  # bf16: the fp32 masters, replaced below by stored ones if any
    if is_model_only(meta):
        return meta
    reader = RangeReader(pieces, tr.chunks, tr.cfg, tp_rank)
    tr.optimizer.load_sharded_state(reader, meta["optimizer"]["scalars"])
    rng = f"rng/rank_{dist.get_rank():05d}.json"
    if rng in meta["files"]:
        verify_files(ckpt, meta, [rng])
        _set_rng_state(json.loads((ckpt / rng).read_text()))
    return meta


def _warn_model_differences(meta: dict, cfg, ckpt: Path) -> None:
    """Shapes are checked tensor by tensor; settings without a shape (rotary base, norm epsilon)
    would load silently into a different model."""
    saved = meta.get("config", {}).get("model", {})
    now = cfg.to_dict()["model"]
    diffs = [f"{k}: checkpoint {saved[k]!r}, run {now[k]!r}" for k in now if k in saved and saved[k] != now[k]]
    if diffs and dist.get_rank() == 0:
        print(f" warning: {ckpt} was saved with a different model config: " + "; ".join(diffs), flush=True)


def _any_rank(flag: bool, device) -> bool:
    from megallm.parallel.data_parallel import any_rank

    return any_rank(flag, device)


def load(tr, path: str | Path, before_iteration: Optional[int] = None) -> Optional[int]:
    """Resume from `path`: a run directory (its newest complete checkpoint, falling back to older
    ones if that one is damaged on any rank) or one iter_N directory. Applies the chosen
    checkpoint's progress through tr.load_state_dict. Returns the iteration loaded, or None when
    the directory holds no checkpoint (a fresh start)."""
    async_writer.wait()  # a save in flight must not be half-visible (nor pruned under our feet)
    if dist.is_initialized():
        dist.barrier()  # rank 0's writer commits the save: every rank lists the checkpoints after it has
    tr.optimizer.finish_param_sync()  # an all-gather still running would overwrite the weights loaded
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
        if not _any_rank(error is not None, tr.device):
            if is_model_only(meta):
                tr.load_state_dict({"iteration": meta.get("iteration", 0) if tr.cfg.checkpoint.keep_iteration else 0})
            else:
                tr.load_state_dict(meta["trainer"])
            _warn_model_differences(meta, tr.cfg, ckpt)
            same_world = meta.get("layout", {}).get("world_size") == dist.get_world_size()
            if not same_world and not is_model_only(meta) and dist.get_rank() == 0:
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
