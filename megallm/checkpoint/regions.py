"""Where the elements of a local parameter live in the logical (HuggingFace-named, unsharded) tensors.

A checkpoint stores *pieces*: boxes of logical tensors (a name, a start corner, a shape), each
written by the rank that owned it. A rank of any layout loads by asking, for every element range it
needs, which logical boxes hold it, and reading the stored pieces that intersect those boxes.

Local parameters relate to logical tensors through `megallm.model.weight_mapping`: the local tensor
on tensor-parallel rank r is the concatenation, along the parts' split dimension, of the r-th
equal pieces of each logical part (a replicated part is the whole logical tensor). So each part is
one rectangle of the local tensor, and that rectangle is one box of its logical tensor.

Optimizer state arrives as flat ranges [start, end) of a local parameter (see
megallm/training/optimizer_state.py). A flat range of a row-major [R, C] tensor is at most three
rectangles (a partial first row, whole rows, a partial last row), each contiguous in memory; cutting
those by the parts' rectangles gives boxes in logical coordinates. Rows of a vocabulary tensor
past the real vocabulary (padding for tensor parallelism) are not stored and load as zeros.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch

from megallm.config import Config
from megallm.model import weight_mapping as wm

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (start, shape)


class PartRect(NamedTuple):
    """One logical part of a local parameter: its rectangle in local coordinates and in logical ones."""

    name: str
    local_start: tuple[int, ...]
    logical_start: tuple[int, ...]
    shape: tuple[int, ...]


class Piece(NamedTuple):
    """Elements [offset, offset + numel(shape)) of a flat range, laid out as `shape` inside the
    local rectangle at local_start, and stored as the logical box (name, logical_start, shape)."""

    name: str
    logical_start: tuple[int, ...]
    shape: tuple[int, ...]
    rect_offset: int  # where the enclosing contiguous rectangle starts inside the flat range
    rect_shape: tuple[int, ...]  # that rectangle's shape
    inner: tuple[slice, ...]  # this piece inside the rectangle


def part_rects(param: torch.Tensor, parts: list[wm.Part], cfg: Config, tp_rank: int) -> list[PartRect]:
    """The rectangles of `param` (a local tensor-parallel shard) that each logical part fills."""
    shape = tuple(param.shape)
    dim = parts[0].dim
    if dim is None:  # replicated: the whole logical tensor on every rank
        origin = (0,) * len(shape)
        return [PartRect(parts[0].logical, origin, origin, _clip(parts[0].logical, 0, shape, cfg))]
    tp = cfg.parallel.tensor_model_parallel_size
    sizes = [s // tp for s in wm.logical_sizes(cfg, parts)]
    rects, offset = [], 0
    for part, size in zip(parts, sizes):
        local_start = tuple(offset if d == dim else 0 for d in range(len(shape)))
        logical_start = tuple(tp_rank * size if d == dim else 0 for d in range(len(shape)))
        part_shape = tuple(size if d == dim else shape[d] for d in range(len(shape)))
        rects.append(PartRect(part.logical, local_start, logical_start,
                              _clip(part.logical, logical_start[0], part_shape, cfg)))
        offset += size
    return rects


def _clip(name: str, first_row: int, shape: tuple[int, ...], cfg: Config) -> tuple[int, ...]:
    """Drop rows of a vocabulary tensor that lie past the real vocabulary (tensor-parallel padding)."""
    if name not in wm.VOCAB_TENSORS:
        return shape
    rows = max(0, min(shape[0], cfg.model.vocab_size - first_row))
    return (rows, *shape[1:])


def flat_rects(shape: tuple[int, ...], start: int, end: int) -> Iterator[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """Elements [start, end) of a row-major tensor as (local start, shape, offset into the range)
    rectangles, each contiguous in memory."""
    if len(shape) == 1:
        if end > start:
            yield (start,), (end - start,), 0
        return
    rows, cols = shape
    assert len(shape) == 2, shape
    pos = start
    while pos < end:
        r, c = divmod(pos, cols)
        if c or end - pos < cols:  # a partial row
            n = min(cols - c, end - pos)
            yield (r, c), (1, n), pos - start
        else:  # as many whole rows as fit
            n_rows = (end - pos) // cols
            n = n_rows * cols
            yield (r, 0), (n_rows, cols), pos - start
        pos += n


def range_pieces(param: torch.Tensor, rects: list[PartRect], start: int, end: int) -> list[Piece]:
    """The logical boxes covering elements [start, end) of param.view(-1)."""
    pieces = []
    for rstart, rshape, offset in flat_rects(tuple(param.shape), start, end):
        for part in rects:
            lo = [max(a, b) for a, b in zip(rstart, part.local_start)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(rstart, rshape, part.local_start, part.shape)]
            if any(b <= a for a, b in zip(lo, hi)):
                continue
            shape = tuple(b - a for a, b in zip(lo, hi))
            logical = tuple(s + a - p for s, a, p in zip(part.logical_start, lo, part.local_start))
            inner = tuple(slice(a - r, b - r) for a, b, r in zip(lo, hi, rstart))
            pieces.append(Piece(part.name, logical, shape, offset, rshape, inner))
    return pieces


def piece_view(flat: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The piece's elements inside `flat` (the 1-D tensor of a range), shaped as the logical box."""
    n = math.prod(piece.rect_shape)
    return flat[piece.rect_offset: piece.rect_offset + n].view(piece.rect_shape)[piece.inner]


def intersect(a: Box, b: Box) -> Box | None:
    lo = [max(x, y) for x, y in zip(a[0], b[0])]
    hi = [min(x + n, y + m) for x, n, y, m in zip(a[0], a[1], b[0], b[1])]
    if any(end <= start for start, end in zip(lo, hi)):
        return None
    return tuple(lo), tuple(end - start for start, end in zip(lo, hi))


def slices(box: Box, origin: tuple[int, ...]) -> tuple[slice, ...]:
    """A box as slices relative to `origin` (the corner of the tensor it is cut from)."""
    return tuple(slice(s - o, s - o + n) for s, n, o in zip(box[0], box[1], origin))
