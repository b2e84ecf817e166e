"""Checkpoint conversion: HuggingFace LLaMA <-> megallm, and megallm between layouts.

megallm checkpoints store boxes ("pieces") of logical, HuggingFace-named tensors (see
megallm/checkpoint/format.py), so every (tp, pp, vpp) layout reads the same files. A model-only
checkpoint written here holds whole tensors, one file per layer (each tensor one piece):

    hf -> megallm       rename nothing, split nothing: group the tensors by layer, cast to fp32,
                        write one layer file at a time; the requested layout is validated and
                        recorded in meta.json as the intended one.
    megallm -> hf       assemble one logical tensor at a time from its pieces (each file's sha256
                        checked first; training checkpoints of any layout, v1 and v2) into
                        safetensors shards of at most max_shard_size, plus config.json,
                        generation_config.json and the index transformers' from_pretrained reads.
    megallm -> megallm  "resharding" is a verified copy of the model files (checksums checked
                        before and after copying) under a new layout that is validated first: the
                        files are the same for every layout. Training checkpoints resume at any
                        layout without it; it exists to check a target layout and to strip the
                        optimizer off a checkpoint (a v1 source comes out in the current format).

Outputs are model-only checkpoints (meta.json without a scheduler: optimizer and schedule start
fresh on --load) written into iter_N.partial/, renamed, then `latest` is written, as a training
save does; HuggingFace output is written to OUTPUT.partial/ and renamed. A failure leaves no output.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from megallm import __version__
from megallm.checkpoint.format import FORMAT, LATEST, file_record, iter_dir, verify_files
from megallm.checkpoint.format import layer_file as file_of
from megallm.checkpoint.hf_config import (
    DTYPES,
    HF_KEYS,
    ConversionError,
    generation_config,
    hf_config_from_model,
    model_config_from_hf,
    read_json,
    token_ids_of,
)
from megallm.checkpoint.hf_files import DEFAULT_MAX_SHARD_SIZE, HFWeights, no_progress, stream_groups, write_hf_weights
from megallm.checkpoint.load import PieceReader, read_meta
from megallm.config import Config, ModelConfig, apply_overrides, validate
from megallm.files import atomic_write
from megallm.model import weight_mapping as wm

# Buffers some old transformers versions saved with the weights; recomputed, never loaded.
IGNORED_HF_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------
# Configs and layouts


def target_config(model: ModelConfig, tp: int = 1, pp: int = 1, vpp: Optional[int] = None,
                  where: str = "", hf_keys: bool = False) -> Config:
    """The config recorded with a converted checkpoint: the model, the intended layout, and the
    model's own context length. Raises ConversionError with every layout rule it breaks."""
    cfg = Config(model=model)
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    cfg.parallel.virtual_pipeline_model_parallel_size = vpp
    if vpp:
        cfg.parallel.pipeline_schedule = "interleaved_1f1b"
    cfg.training.seq_length = model.max_position_embeddings
    errors = validate(cfg)
    if errors:
        def hint(error: str) -> str:
            field = error.split("=", 1)[0]
            return f" (key '{HF_KEYS[field]}')" if hf_keys and field in HF_KEYS else ""

        raise ConversionError(f"{where}: " + "; ".join(e + hint(e) for e in errors))
    return cfg


def config_from_meta(meta: dict, where: str) -> Config:
    flat = {name: value for section in meta.get("config", {}).values() for name, value in section.items()}
    if not flat:
        raise ConversionError(f"{where}: no 'config' to take the model shape from")
    return apply_overrides(Config(), flat, where=where)


def model_flags(m: ModelConfig) -> str:
    """The launcher flags that build this model (norm epsilon and RoPE base included: loading
    cannot catch those, the weights have the same shapes either way)."""
    return " ".join(f"--{name.replace('_', '-')} {getattr(m, name)}" for name in HF_KEYS)


def expected_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every logical tensor of the model in HuggingFace's order: embedding, layers, norm, head."""
    head = wm.logical_shapes(cfg)
    shapes = {"model.embed_tokens.weight": head.pop("model.embed_tokens.weight")}
    for layer in range(cfg.model.num_layers):
        shapes.update(wm.logical_shapes(cfg, layer))
    return shapes | head


def megallm_files(shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, list[str]]]:
    """[(model/ file name, its tensor names)] in model order."""
    groups: dict[str, list[str]] = {}
    for name in shapes:
        groups.setdefault(file_of(name), []).append(name)
    return list(groups.items())


# ----------------------------------------------------------------------------------------------
# Output directories: nothing half-written survives a failure


def _empty_output(path: Path, allowed_leftovers: tuple[str, ...] = ()) -> None:
    if path.exists() and not path.is_dir():
        raise ConversionError(f"{path}: exists and is not a directory")
    if path.is_dir():
        others = [p.name for p in path.iterdir() if not p.name.endswith(allowed_leftovers)]
        if others:
            raise ConversionError(f"{path}: not empty (holds {sorted(others)[0]}, ...); "
                                  "choose a new --output directory")


@contextmanager
def _partial_dir(partial: Path):
    """A scratch directory removed again if the body fails."""
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted conversion
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


class MegallmWriter:
    """Writes model/ files into ROOT/iter_N.partial; commit() adds meta.json, renames and writes latest."""

    def __init__(self, root: str | Path, iteration: int):
        self.root, self.iteration = Path(root), iteration
        _empty_output(self.root, allowed_leftovers=(".partial",))
        self.final = iter_dir(self.root, iteration)
        self.partial = Path(str(self.final) + ".partial")
        self.files: dict[str, dict] = {}
        self.pieces: list[dict] = []

    def _record(self, name: str, writer_rank: int = 0) -> dict:
        self.files[name] = file_record(self.partial / name, writer_rank)
        return self.files[name]

    def write(self, fname: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file({k: v.to(torch.float32).contiguous() for k, v in tensors.items()},
                  str(self.partial / "model" / fname), metadata={"format": FORMAT})
        self._record(f"model/{fname}")
        self.pieces += [{"t": k, "at": [0] * v.ndim, "shape": list(v.shape), "file": f"model/{fname}", "key": k}
                        for k, v in tensors.items()]

    def copy_verified(self, src_ckpt: Path, src_meta: dict, name: str) -> None:
        """Copy one model/ file with its pieces (weights only), checksums checked before and after."""
        verify_files(src_ckpt, src_meta, [name])
        (self.partial / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src_ckpt / name, self.partial / name)
        writer = src_meta["files"][name].get("writer_rank", 0)
        if self._record(name, writer)["sha256"] != src_meta["files"][name]["sha256"]:
            raise ConversionError(f"{self.partial / name}: checksum differs from {src_ckpt / name} after copying")
        self.pieces += [{k: v for k, v in p.items() if k != "optim"} for p in src_meta["pieces"] if p["file"] == name]

    def commit(self, cfg: Config, extra: dict) -> Path:
        p = cfg.parallel
        meta = {"format": FORMAT, "megallm_version": __version__, "iteration": self.iteration,
                "config": cfg.to_dict(), "pieces": self.pieces,
                "tensors": {k: list(v) for k, v in expected_shapes(cfg).items()},
                "layout": {"tp": p.tensor_model_parallel_size, "pp": p.pipeline_model_parallel_size,
                           "vpp": p.virtual_pipeline_model_parallel_size, "dp": None, "world_size": None,
                           "use_distributed_optimizer": False, "intended": True},
                **extra, "files": self.files}
        (self.partial / "meta.json").write_text(json.dumps(meta, indent=1))
        os.replace(self.partial, self.final)
        atomic_write(self.root / LATEST, str(self.iteration))
        return self.final

    @contextmanager
    def open(self):
        with _partial_dir(self.partial):
            (self.partial / "model").mkdir()
            yield self


# ----------------------------------------------------------------------------------------------
# Reading megallm checkpoints


def resolve_megallm(path: str | Path) -> Path:
    """An iter_N directory as given, or the `latest` one of a run directory."""
    path = Path(path)
    if (path / "meta.json").exists():
        return path
    if (path / LATEST).exists():
        text = (path / LATEST).read_text().strip()
        if not text.isdigit():
            raise ConversionError(f"{path / LATEST}: {text!r} is not an iteration number")
        return iter_dir(path, int(text))
    raise ConversionError(f"{path}: neither a megallm checkpoint (no meta.json) nor a run directory (no {LATEST})")


class MegallmReader:
    """Whole logical tensors of a megallm checkpoint (any format, any layout that wrote it),
    assembled from their pieces; each file's size and sha256 checked before its first read."""

    def __init__(self, ckpt: Path, meta: dict):
        self.ckpt, self.meta = ckpt, meta
        self.pieces = PieceReader(ckpt, meta)

    def check_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Every tensor present, at its shape, and covered by its pieces, from meta.json and headers only."""
        where = self.ckpt / "meta.json"
        for name, shape in shapes.items():
            saved = self.meta.get("tensors", {}).get(name)
            if saved is None:
                raise ConversionError(f"{where}: no tensor '{name}'")
            if tuple(saved) != tuple(shape):
                raise ConversionError(f"{where}: '{name}' has shape {tuple(saved)}, the config in meta.json "
                                      f"says {shape}")
            stored = sum(math.prod(p["shape"]) for p in self.pieces.by_name.get(name, []))
            if stored != math.prod(shape):
                raise ConversionError(f"{where}: pieces of '{name}' hold {stored} of {math.prod(shape)} elements")
        for f in {p["file"] for p in self.meta["pieces"]}:
            if not (self.ckpt / f).exists():
                raise ConversionError(f"{self.ckpt / f}: missing")

    def get(self, name: str) -> torch.Tensor:
        """The fp32 weights (the fp32 masters when the checkpoint has them)."""
        shape = tuple(self.meta["tensors"][name])
        return self.pieces.read(name, (0,) * len(shape), shape, "main_param")


def _open_megallm(src: str | Path) -> tuple[Path, dict, Config]:
    ckpt = resolve_megallm(src)
    meta = read_meta(ckpt)
    return ckpt, meta, config_from_meta(meta, str(ckpt / "meta.json"))


# ----------------------------------------------------------------------------------------------
# The three conversions


def check_hf_weights(weights: HFWeights, shapes: dict[str, tuple[int, ...]], config_path: Path) -> None:
    """Every tensor the model needs, with its shape, and nothing it would silently drop."""
    found = weights.shapes()
    for name, shape in shapes.items():
        if name not in found:
            raise ConversionError(f"{weights.index_path}: no tensor '{name}' (every LLaMA layer needs it)")
        if found[name] != shape:
            raise ConversionError(f"{weights.file_of(name)}: '{name}' has shape {found[name]}, {config_path.name} "
                                  f"implies {shape}")
    for name in found:
        if name not in shapes and not IGNORED_HF_TENSORS.fullmatch(name):
            raise ConversionError(f"{weights.file_of(name)}: tensor '{name}' is not part of the LLaMA model "
                                  "megallm builds (biases, extra heads and tied weights are not supported)")


def hf_to_megallm(src: str | Path, dst: str | Path, tp: int = 1, pp: int = 1, vpp: Optional[int] = None,
                  progress=no_progress) -> Path:
    """HuggingFace LLaMA directory -> model-only megallm checkpoint at iteration 0. Returns its iter dir."""
    src = Path(src)
    config_path = src / "config.json"
    if not config_path.exists() and ((src / "meta.json").exists() or (src / LATEST).exists()):
        raise ConversionError(f"{src}: a megallm checkpoint, not a HuggingFace directory (use --from megallm)")
    hf = read_json(config_path)
    cfg = target_config(model_config_from_hf(hf, str(config_path)), tp, pp, vpp, str(config_path), hf_keys=True)
    shapes = expected_shapes(cfg)
    weights = HFWeights(src)
    check_hf_weights(weights, shapes, config_path)
    weights.expect(shapes)
    writer = MegallmWriter(dst, iteration=0)
    with writer.open():
        stream_groups(megallm_files(shapes), weights.get, writer.write, progress, desc="hf -> megallm")
        return writer.commit(cfg, {"converted_from": {"format": "huggingface", "path": str(src.resolve())},
                                   "hf_token_ids": token_ids_of(hf)})


def megallm_to_hf(src: str | Path, dst: str | Path, dtype: str = "fp32",
                  max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, progress=no_progress) -> Path:
    """megallm checkpoint (a run directory's latest, or an iter_N directory) -> HuggingFace directory."""
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    ckpt, meta, cfg = _open_megallm(src)
    dst = Path(dst)
    _empty_output(dst)
    hf_config = hf_config_from_model(cfg.model, dtype, meta.get("hf_token_ids"))
    shapes = expected_shapes(cfg)
    reader = MegallmReader(ckpt, meta)
    reader.check_shapes(shapes)
    with _partial_dir(dst.with_name(dst.name + ".partial")) as partial:
        write_hf_weights(partial, shapes, reader.get, TORCH_DTYPES[dtype], max_shard_size, progress)
        (partial / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        gen = generation_config(meta.get("hf_token_ids"))
        (partial / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if dst.exists():
            dst.rmdir()  # empty, checked above
        os.replace(partial, dst)
    return dst


def reshard(src: str | Path, dst: str | Path, tp: int = 1, pp: int = 1, vpp: Optional[int] = None,
            progress=no_progress) -> Path:
    """megallm -> megallm at another (validated) layout: a checksum-verified copy of the model
    files, keeping the source's iteration (the launcher's --keep-iteration decides whether
    training continues its numbering). Optimizer state is not carried over."""
    ckpt, meta, source_cfg = _open_megallm(src)
    cfg = target_config(source_cfg.model, tp, pp, vpp, str(ckpt / "meta.json"))
    shapes = expected_shapes(cfg)
    reader = MegallmReader(ckpt, meta)
    reader.check_shapes(shapes)
    writer = MegallmWriter(dst, iteration=int(meta.get("iteration", 0)))
    with writer.open():
        if meta.get("converted_from_format") or "main_param" in meta.get("optimizer", {}).get("keys", []):
            # v1 files, or low-precision weights beside fp32 masters: rewritten whole, in fp32
            stream_groups(megallm_files(shapes), reader.get, writer.write, progress, desc="megallm -> megallm")
        else:
            for name in progress(sorted({p["file"] for p in meta["pieces"]}), desc="megallm -> megallm", unit="file"):
                writer.copy_verified(ckpt, meta, name)
        extra = {"converted_from": {"format": "megallm", "path": str(ckpt.resolve()), "layout": meta.get("layout")}}
        if meta.get("hf_token_ids"):
            extra["hf_token_ids"] = meta["hf_token_ids"]
        return writer.commit(cfg, extra)
