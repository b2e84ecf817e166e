"""HuggingFace weight files, read and written one tensor at a time.

Reading: `model.safetensors[.index.json]` through `safetensors.safe_open` (headers first, tensor data
only when asked), or `pytorch_model.bin[.index.json]` through `torch.load(weights_only=True,
mmap=True)` (no code runs, nothing is read until touched). A file is closed as soon as the last
tensor needed from it has been read, so memory-mapped pages of finished shards do not pile up.

Writing: `model-0000k-of-0000N.safetensors` shards of at most `max_shard_size` bytes (a larger
single tensor gets a shard of its own, as in transformers) and `model.safetensors.index.json`.
The shard plan is made from shapes before any data is read, so N is known up front and only one
shard's tensors are ever held in memory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megallm.checkpoint.hf_config import ConversionError

SAFE_INDEX, SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # transformers' default "5GB"


def no_progress(iterable: Iterable, **_) -> Iterable:
    return iterable


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes (transformers' units: GB = 10**9)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(text).upper())
    if not m:
        raise ConversionError(f"max shard size {text!r}: expected a size such as 5GB, 500MB or 2GiB")
    units = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(m.group(1)) * units[m.group(2)])


# ----------------------------------------------------------------------------------------------
# Reading


class _SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        try:
            self._f = safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError) as e:
            raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None

    def keys(self) -> list[str]:
        return list(self._f.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._f.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._f.get_tensor(name)


class _TorchBinFile:
    def __init__(self, path: Path):
        self.path = path
        try:
            self._state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # pickle errors of all kinds, refused globals, truncated zips
            raise ConversionError(f"{path}: not loadable with torch.load(weights_only=True, mmap=True) ({e})") from None
        if not isinstance(self._state, dict):
            raise ConversionError(f"{path}: holds a {type(self._state).__name__}, expected a state dict")

    def keys(self) -> list[str]:
        return list(self._state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self._state[name].clone()  # a copy: the mmap-backed original is dropped with the file


class HFWeights:
    """The tensors of a HuggingFace checkpoint directory, by name, opened lazily.

    `expect(names)` declares which tensors will be read; a file is closed once all of its
    expected tensors have been read."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._open: dict[str, object] = {}
        self._remaining: dict[str, int] = {}
        self.index_path, self.weight_map = self._find_files()

    def _find_files(self) -> tuple[Path, dict[str, str]]:
        d = self.directory
        for index_name, single in ((SAFE_INDEX, SAFE_SINGLE), (BIN_INDEX, BIN_SINGLE)):
            index = d / index_name
            if index.exists():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ConversionError(f"{index}: not a weight index with a 'weight_map' ({e})") from None
                for fname in sorted(set(weight_map.values())):
                    if not (d / fname).exists():
                        raise ConversionError(f"{d / fname}: missing (listed in {index})")
                return index, weight_map
            if (d / single).exists():
                return d / single, {name: single for name in self._reader(single).keys()}
        shards = (sorted(p.name for p in d.glob("model-*.safetensors"))
                  + sorted(p.name for p in d.glob("pytorch_model-*.bin")))
        if shards:
            raise ConversionError(f"{d}: has shards ({shards[0]}, ...) but no {SAFE_INDEX} or {BIN_INDEX}")
        raise ConversionError(f"{d}: no {SAFE_INDEX}, {SAFE_SINGLE}, {BIN_INDEX} or {BIN_SINGLE}")

    def _reader(self, fname: str):
        if fname not in self._open:
            path = self.directory / fname
            self._open[fname] = _TorchBinFile(path) if fname.endswith(".bin") else _SafetensorsFile(path)
        return self._open[fname]

    def file_of(self, name: str) -> Path:
        return self.directory / self.weight_map[name]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, read from file headers only; files are closed again afterwards.
        A name the index lists but its file lacks is an error naming both."""
        shapes = {}
        by_file: dict[str, list[str]] = {}
        for name, fname in self.weight_map.items():
            by_file.setdefault(fname, []).append(name)
        for fname, names in sorted(by_file.items()):
            reader = self._reader(fname)
            present = set(reader.keys())
            for name in names:
                if name not in present:
                    raise ConversionError(f"{self.directory / fname}: no tensor '{name}' (listed there by "
                                          f"{self.index_path.name})")
                shapes[name] = reader.shape(name)
            self._open.pop(fname)
        return shapes

    def expect(self, names: Iterable[str]) -> None:
        self._remaining = {}
        for name in names:
            fname = self.weight_map[name]
            self._remaining[fname] = self._remaining.get(fname, 0) + 1

    def get(self, name: str) -> torch.Tensor:
        fname = self.weight_map[name]
        t = self._reader(fname).get(name)
        self._remaining[fname] = self._remaining.get(fname, 1) - 1
        if self._remaining[fname] <= 0:
            self._open.pop(fname, None)  # unmaps the file: its pages no longer count against us
        return t


# ----------------------------------------------------------------------------------------------
# Writing


def plan_shards(sizes: dict[str, int], max_shard_size: int) -> list[list[str]]:
    """Names (in the given order) packed greedily into shards of at most max_shard_size bytes."""
    shards, current, used = [], [], 0
    for name, nbytes in sizes.items():
        if current and used + nbytes > max_shard_size:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    if current:
        shards.append(current)
    return shards


def shard_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def stream_groups(groups: list[tuple[str, list[str]]], get: Callable[[str], torch.Tensor],
                  write: Callable[[str, dict[str, torch.Tensor]], None], progress=no_progress, desc: str = "") -> None:
    """Read tensors one by one (one progress step each) and write each group (an output file) as
    soon as its last tensor is in. A callback and not a generator: a consumer's loop variable would
    keep the previous group alive while the next one fills, doubling the peak."""
    total = sum(len(names) for _, names in groups)
    steps = iter(progress(range(total), total=total, desc=desc, unit="tensor"))
    for key, names in groups:
        tensors = {}
        for name in names:
            tensors[name] = get(name)
            next(steps, None)
        write(key, tensors)
        del tensors
    for _ in steps:  # let a progress bar close
        pass


def write_hf_weights(out_dir: Path, shapes: dict[str, tuple[int, ...]], get: Callable[[str], torch.Tensor],
                     dtype: torch.dtype, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                     progress=no_progress) -> dict:
    """Write the tensors named in `shapes` (in its order; get(name) returns each) as safetensors
    shards + index into out_dir. Returns the index."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {name: itemsize * int(torch.Size(shape).numel()) for name, shape in shapes.items()}
    plan = plan_shards(sizes, max_shard_size)

    def converted(name: str) -> torch.Tensor:
        t = get(name)
        if tuple(t.shape) != tuple(shapes[name]):
            raise ConversionError(f"{name}: shape {tuple(t.shape)}, expected {tuple(shapes[name])}")
        return t.to(dtype).contiguous()

    groups = [(shard_name(k + 1, len(plan)), names) for k, names in enumerate(plan)]
    weight_map = {}

    def write(fname: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in tensors})

    stream_groups(groups, converted, write, progress, desc="write hf")
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return index
