"""The one mapping between megallm's sharded parameters and LLaMA2's logical weights.

Logical weights carry HuggingFace's names and shapes (`model.layers.3.self_attn.q_proj.weight`,
[heads * head_dim, hidden]), unsharded and with the vocabulary unpadded. They are what checkpoints
store, what initialisation draws, and what the HuggingFace converter reads and writes, so a
checkpoint is independent of the (tp, pp, vpp) layout that wrote it.

A local parameter on tensor-parallel rank r of T is made of one or more logical tensors, each cut
into T pieces along `dim` and the r-th pieces concatenated (dim None: replicated). Because query
heads are cut in the same proportion as key/value groups, rank r's heads use exactly rank r's
groups: GQA grouping survives the cut.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from typing import NamedTuple, Optional

import torch

from megallm.config import Config


class Part(NamedTuple):
    logical: str  # name relative to the layer (or absolute for non-layer tensors)
    dim: Optional[int]  # split dim across tensor-parallel ranks; None = replicated


LAYER_PARTS: dict[str, list[Part]] = {
    "input_layernorm.weight": [Part("input_layernorm.weight", None)],
    "self_attention.linear_qkv.weight": [
        Part("self_attn.q_proj.weight", 0), Part("self_attn.k_proj.weight", 0), Part("self_attn.v_proj.weight", 0)],
    "self_attention.linear_proj.weight": [Part("self_attn.o_proj.weight", 1)],
    "post_attention_layernorm.weight": [Part("post_attention_layernorm.weight", None)],
    "mlp.linear_fc1.weight": [Part("mlp.gate_proj.weight", 0), Part("mlp.up_proj.weight", 0)],
    "mlp.linear_fc2.weight": [Part("mlp.down_proj.weight", 1)],
}
OTHER_PARTS: dict[str, list[Part]] = {
    "embedding.weight": [Part("model.embed_tokens.weight", 0)],
    "final_layernorm.weight": [Part("model.norm.weight", None)],
    "output_layer.weight": [Part("lm_head.weight", 0)],
}
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def layer_prefix(layer_number: int) -> str:
    return f"model.layers.{layer_number}."


def parts_of(chunk, local_name: str) -> list[Part]:
    """Absolute logical parts of a local parameter of a LlamaChunk."""
    if local_name.startswith("layers."):
        _, index, suffix = local_name.split(".", 2)
        prefix = layer_prefix(chunk.layer_numbers[int(index)])
        return [Part(prefix + p.logical, p.dim) for p in LAYER_PARTS[suffix]]
    return OTHER_PARTS[local_name]


def logical_shapes(cfg: Config, layer_number: Optional[int] = None) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a layer's logical tensors, or of the non-layer ones when layer is None."""
    m = cfg.model
    h, d = m.hidden_size, m.kv_channels
    if layer_number is None:
        return {"model.embed_tokens.weight": (m.vocab_size, h), "model.norm.weight": (h,),
                "lm_head.weight": (m.vocab_size, h)}
    p = layer_prefix(layer_number)
    return {
        p + "input_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (m.num_attention_heads * d, h),
        p + "self_attn.k_proj.weight": (m.num_query_groups * d, h),
        p + "self_attn.v_proj.weight": (m.num_query_groups * d, h),
        p + "self_attn.o_proj.weight": (h, m.num_attention_heads * d),
        p + "post_attention_layernorm.weight": (h,),
        p + "mlp.gate_proj.weight": (m.ffn_hidden_size, h),
        p + "mlp.up_proj.weight": (m.ffn_hidden_size, h),
        p + "mlp.down_proj.weight": (h, m.ffn_hidden_size),
    }


def pad_vocab(t: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """Padding rows are zero: they never win a softmax against trained rows and get no gradient
    from real tokens; they exist only so the vocabulary divides over tensor-parallel ranks."""
    if t.shape[0] == padded_rows:
        return t
    return torch.cat([t, t.new_zeros(padded_rows - t.shape[0], *t.shape[1:])])


def shard(parts: list[torch.Tensor], dims: list[Optional[int]], tp_rank: int, tp: int) -> torch.Tensor:
    pieces = [t if dim is None else t.chunk(tp, dim=dim)[tp_rank] for t, dim in zip(parts, dims)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dims[0])


def unshard(shards: list[torch.Tensor], sizes: list[int], dims: list[Optional[int]]) -> list[torch.Tensor]:
    """Inverse of shard: per-rank local tensors -> logical tensors. sizes are the logical sizes
    along each part's dim (ignored for replicated parts)."""
    if dims[0] is None:
        return [shards[0]]
    tp = len(shards)
    local_sizes = [size // tp for size in sizes]
    per_rank = [s.split(local_sizes, dim=dims[0]) for s in shards]
    return [torch.cat([pieces[i] for pieces in per_rank], dim=dims[0]) for i in range(len(sizes))]


def local_parameters(chunk) -> Iterator[tuple[str, torch.nn.Parameter, list[Part]]]:
    for name, param in chunk.named_parameters():
        yield name, param, parts_of(chunk, name)


def mark_sharded_parameters(chunk) -> None:
    """Set megatron's `tensor_model_parallel` attribute from this mapping. Megatron sets it only
    while initialising weights itself, which we skip (see init_weights); the global grad norm
    needs it to count replicated parameters once."""
    for _, param, parts in local_parameters(chunk):
        param.tensor_model_parallel = any(p.dim is not None for p in parts)


@torch.no_grad()
def load_logical(chunk, get: Callable[[str], torch.Tensor], cfg: Config, tp_rank: int, strict_shapes=True) -> None:
    """Fill a chunk's local parameters from logical tensors returned by get(name)."""
    tp, shapes = cfg.parallel.tensor_model_parallel_size, {}
    for layer in chunk.layer_numbers:
        shapes.update(logical_shapes(cfg, layer))
    shapes.update(logical_shapes(cfg))
    for name, param, parts in local_parameters(chunk):
        tensors = []
        for part in parts:
            t = get(part.logical)
            if strict_shapes and tuple(t.shape) != shapes[part.logical]:
                raise ValueError(f"{part.logical}: shape {tuple(t.shape)} does not match the model's "
                                 f"{shapes[part.logical]}")
            if part.logical in VOCAB_TENSORS:
                t = pad_vocab(t, cfg.padded_vocab_size)
            tensors.append(t.to(param.device, torch.float32))
        local = shard(tensors, [p.dim for p in parts], tp_rank, tp)
        if local.shape != param.shape:
            raise ValueError(f"{name}: the {tp}-way shard has shape {tuple(local.shape)}, "
                             f"the parameter {tuple(param.shape)}")
        param.copy_(local)


def logical_sizes(cfg: Config, parts: list[Part]) -> list[int]:
    shapes = {}
    for part in parts:
        if part.dim is None:
            shapes[part.logical] = 0
            continue
        layer = int(part.logical.split(".")[2]) if part.logical.startswith("model.layers.") else None
        shape = logical_shapes(cfg, layer)[part.logical]
        size = shape[part.dim]
        shapes[part.logical] = cfg.padded_vocab_size if part.logical in VOCAB_TENSORS else size
    return [shapes[p.logical] for p in parts]


def to_logical(shards: list[torch.Tensor], parts: list[Part], cfg: Config) -> dict[str, torch.Tensor]:
    """All tensor-parallel ranks' copies of one local parameter -> its logical tensors."""
    tensors = unshard(shards, logical_sizes(cfg, parts), [p.dim for p in parts])
    out = {}
    for part, t in zip(parts, tensors):
        out[part.logical] = t[: cfg.model.vocab_size] if part.logical in VOCAB_TENSORS else t
    return out


# ----------------------------------------------------------------------------------------------
# Initialisation: each logical tensor drawn from its own seeded generator, so the initial model is
# the same whatever the layout (the basis of every layout-equivalence test).


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def init_logical(cfg: Config, name: str, shape: tuple[int, ...], device="cpu") -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, device=device)
    std = cfg.model.init_method_std
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        std = std / math.sqrt(2.0 * cfg.model.num_layers)
    g = torch.Generator(device=device).manual_seed(_tensor_seed(cfg.training.seed, name))
    return torch.empty(shape, device=device).normal_(0.0, std, generator=g)


def init_weights(chunk, cfg: Config, tp_rank: int) -> None:
    shapes = logical_shapes(cfg)
    for layer in chunk.layer_numbers:
        shapes.update(logical_shapes(cfg, layer))
    device = next(chunk.parameters()).device
    load_logical(chunk, lambda name: init_logical(cfg, name, shapes[name], device), cfg, tp_rank)
