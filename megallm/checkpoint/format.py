"""The on-disk checkpoint format (megallm-checkpoint-v2). Nothing in it is pickled: loading never runs code.

    SAVE/latest_checkpointed_iteration.txt     newest complete, verified iteration; written last
    SAVE/iter_0000050/
        meta.json                              format, iteration, the trainer's state (Trainer.state_dict),
                                               resolved config, layout, optimizer scalars, every file with
                                               its bytes, sha256 and writer_rank, and the piece index
        model/rank_00005.safetensors           weights that rank 5 owns, as boxes of logical tensors
        optim/rank_00005.safetensors           its optimizer state (exp_avg, exp_avg_sq, main_param) for
                                               the same boxes
        rng/rank_00005.json                    its python, numpy and torch RNG states
        done/rank_00005.json                   (while saving) rank 5's files are written and hashed

A piece is a box of one logical (HuggingFace-named, unsharded) tensor: {"t": name, "at": start
corner, "shape": ..., "file": model file, "key": tensor name in it, "optim": optim file or absent}.
Pieces never overlap and together cover every logical tensor once, whatever layout wrote them,
so any layout loads by intersecting the boxes it needs with the stored ones (see regions.py).

A save is written into iter_N.partial/ and renamed to iter_N/ by rank 0 only after every rank
has left its done/ marker; then `latest` is replaced atomically. A kill at any point leaves the
previous checkpoint as latest.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

FORMAT = "megallm-checkpoint-v2"
LATEST = "latest_checkpointed_iteration.txt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def iter_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def partial_dir(root: str | Path, iteration: int) -> Path:
    return Path(str(iter_dir(root, iteration)) + ".partial")


def rank_file(kind: str, rank: int, suffix: str = "safetensors") -> str:
    return f"{kind}/rank_{rank:05d}.{suffix}"


def layer_file(logical_name: str) -> str:
    """Where model-only checkpoints (the converter's) keep a whole logical tensor: one file per layer."""
    if logical_name.startswith("model.layers."):
        return f"layer_{int(logical_name.split('.')[2]):05d}.safetensors"
    return "embedding.safetensors" if logical_name == "model.embed_tokens.weight" else "head.safetensors"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_record(path: Path, writer_rank: int = 0) -> dict:
    """What meta.json keeps of each file, for `verify_files` to check on load."""
    return {"bytes": path.stat().st_size, "sha256": sha256(path), "writer_rank": writer_rank}


def _writer(expected: dict) -> str:
    return f"; written by rank {expected['writer_rank']}" if "writer_rank" in expected else ""


def verify_files(ckpt: Path, meta: dict, names) -> None:
    """Size and sha256 of each named file against meta.json; the error names the file and its writer."""
    for name in names:
        path, expected = ckpt / name, meta["files"].get(name)
        if expected is None or not path.exists():
            raise CheckpointError(f"{path}: missing" + (_writer(expected) if expected else ""))
        if path.stat().st_size != expected["bytes"]:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, expected {expected['bytes']} "
                                  f"(truncated?{_writer(expected)})")
        if sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path}: checksum mismatch (corrupted{_writer(expected)})")


def is_model_only(meta: dict) -> bool:
    """Converted checkpoints (tools/convert_checkpoint.py) hold weights only: optimizer, schedule
    and spike detector start fresh."""
    return "trainer" not in meta


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


def load_candidates(path: str | Path, before_iteration: Optional[int] = None) -> list[Path]:
    """The checkpoints a load tries, in order: `path` itself when it is one iter_N directory, else
    the run directory's complete checkpoints (before `before_iteration`), newest first."""
    path = Path(path)
    if (path / "meta.json").exists() or path.name.startswith("iter_"):
        return [path]
    its = [i for i in complete_iterations(path) if before_iteration is None or i < before_iteration]
    return [iter_dir(path, i) for i in reversed(its)]
