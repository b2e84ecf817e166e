"""Activation recompute: keep less for backward, run parts of the forward again instead (Megatron's
--recompute-granularity / --recompute-method / --recompute-num-layers / --recompute-modules).

    full       checkpoint whole decoder layers: only each checkpointed unit's input is kept
               (h per token), the unit runs again in backward.
               uniform: the chunk's layers in groups of recompute_num_layers, one checkpoint each.
               block:   the first recompute_num_layers layers of each chunk, one checkpoint each; the
                        rest keep everything (spare memory goes to fewer re-runs).
    selective  checkpoint the cheap, memory-hungry pieces inside a layer (recompute_modules):
               layernorm  both RMSNorms: the norm's own saved tensors go (megallm.model.norm keeps
                          its input, which the checkpoint keeps anyway, and the fp32 1/rms); the
                          output stays (it is the next GEMM's input)
               swiglu     silu(gate) * up: silu(gate) (f per token) is not kept, only fc1's output
               mlp        the whole SwiGLU MLP: only its input is kept (2f + 2f per token saved)
               Core attention needs no entry: SDPA's flash and memory-efficient kernels never
               store the scores and recompute them in backward already.

torch.utils.checkpoint with use_reentrant=False: it restores the RNG state (dropout masks repeat)
and works with inputs that need no grad, so the re-run is the same arithmetic and gradients are
bitwise those without recompute (tests/test_recompute.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

MODULES = ("layernorm", "swiglu", "mlp")


def checkpoint(fn: Callable, *args: torch.Tensor) -> torch.Tensor:
    """fn(*args), keeping only args for backward (nothing to keep without grad: plain call)."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return _checkpoint(fn, *args, use_reentrant=False)


def maybe_checkpoint(enabled: bool, fn: Callable, *args: torch.Tensor) -> torch.Tensor:
    return checkpoint(fn, *args) if enabled else fn(*args)


def _run(layers: Sequence[nn.Module]) -> Callable:
    def run(x, cos, sin):
        for layer in layers:
            x = layer(x, cos, sin)
        return x
    return run


def checkpointed_units(num_layers: int, method: str, recompute_num_layers: int) -> list[tuple[int, int, bool]]:
    """[(first, count, checkpointed)] covering a chunk's layers in order: what `run_layers` runs and
    what the planner counts (one kept input per checkpointed unit, the full set for the others)."""
    if method == "uniform":
        n = recompute_num_layers
        return [(i, min(n, num_layers - i), True) for i in range(0, num_layers, n)]
    k = min(recompute_num_layers, num_layers)
    return [(i, 1, True) for i in range(k)] + ([(k, num_layers - k, False)] if k < num_layers else [])


def run_layers(layers: Sequence[nn.Module], x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               granularity: str | None, method: str | None, recompute_num_layers: int | None) -> torch.Tensor:
    """The chunk's decoder layers, with full recompute when granularity == 'full'."""
    if granularity != "full":
        return _run(layers)(x, cos, sin)
    for first, count, ckpt in checkpointed_units(len(layers), method, recompute_num_layers):
        run = _run(layers[first:first + count])
        x = checkpoint(run, x, cos, sin) if ckpt else run(x, cos, sin)
    return x
