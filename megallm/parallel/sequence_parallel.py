"""Sequence parallelism (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models"; megatron-core's `sequence_parallel=True`).

With tensor parallelism alone, the norms, dropouts and residual adds between the tensor-parallel
GEMMs run on the whole [s, b, h] activation, replicated on every tp rank. Sequence parallelism
splits them along the sequence: each tp rank holds [s/tp, b, h] there, and

    column-parallel GEMM input:  all-gather over tp      (backward: reduce-scatter)
    row-parallel GEMM output:    reduce-scatter over tp  (backward: all-gather)

replace the all-reduce after each row-parallel GEMM (same bytes on the wire, 1/tp of the memory).
The RMSNorm weights stay replicated, but each rank now sees only its own tokens, so their
gradients are partial sums: `allreduce_sequence_parallel_grads` adds them over tp after backward.

Device-agnostic shim. megatron-core's sequence-parallel code (its linear's autograd Function and
the mappings `reduce_scatter_to_sequence_parallel_region` / `scatter_to_sequence_parallel_region`)
allocates every communication buffer with `torch.cuda.current_device()`, so it cannot run on CPU.
On CUDA tensors the functions below call megatron-core's own; on any other device they run twins
that do the same arithmetic with buffers on the input's device, through torch's
`all_gather_into_tensor` / `reduce_scatter_tensor` (gloo supports both). The twins are installed
per layer by the model (`linear_with_sequence_parallel` as the column-parallel layers'
`_forward_impl`, `RowParallelLinear` below); torch and megatron are not patched.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import layers as megatron_layers
from torch import nn

# ------------------------------------------------------------------------------------------------
# Collectives along the first (sequence) dimension, buffers on the input's device


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    out = torch.empty((x.shape[0] * group.size(), *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    n = group.size()
    assert x.shape[0] % n == 0, f"sequence length {x.shape[0]} must divide by tensor parallel size {n}"
    out = torch.empty((x.shape[0] // n, *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


def _split(x: torch.Tensor, group) -> torch.Tensor:
    return x.chunk(group.size(), dim=0)[group.rank()].contiguous()


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    """forward: keep this rank's sequence slice; backward: all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group), None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """forward: reduce-scatter (sum of the row-parallel partial outputs); backward: all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group), None


def scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    if group.size() == 1:
        return x
    if x.is_cuda:
        return tensor_parallel.scatter_to_sequence_parallel_region(x, group=group)
    return _ScatterToSequenceParallelRegion.apply(x, group)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    if group.size() == 1:
        return x
    if x.is_cuda:
        return tensor_parallel.reduce_scatter_to_sequence_parallel_region(x, group=group)
    return _ReduceScatterToSequenceParallelRegion.apply(x, group)


# ------------------------------------------------------------------------------------------------
# The column-parallel GEMM with its all-gather


class _LinearWithSequenceParallel(torch.autograd.Function):
    """megatron-core's LinearWithGradAccumulationAndAsyncCommunication with sequence_parallel=True,
    minus the CUDA-only parts (async handles, fused weight-gradient accumulation): only the local
    [s/tp, b, h] input is saved, and it is gathered again in backward for the weight gradient, so
    the GEMM's saved input costs 1/tp of the gathered one. Runs its backward in the forward's
    autocast state, as megatron's (custom_fwd/custom_bwd) does."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x, weight, bias, group):
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.use_bias = group, bias is not None
        out = torch.matmul(_all_gather(x, group), weight.t())
        return out + bias if bias is not None else out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        total = _all_gather(x, ctx.group)
        grad_input = _reduce_scatter(grad_output.matmul(weight), ctx.group)
        go = grad_output.reshape(-1, grad_output.shape[-1])
        grad_weight = go.t().matmul(total.reshape(-1, total.shape[-1]))
        grad_bias = go.sum(dim=0) if ctx.use_bias else None
        return grad_input, grad_weight, grad_bias, None


def linear_with_sequence_parallel(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                  gradient_accumulation_fusion: bool, allreduce_dgrad: bool, sequence_parallel: bool,
                                  grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None, **_):
    """Drop-in for megatron's `linear_with_grad_accumulation_and_async_allreduce` (a linear layer's
    `_forward_impl`): megatron's own on CUDA, the twin above elsewhere."""
    if input.is_cuda or not sequence_parallel:
        return megatron_layers.linear_with_grad_accumulation_and_async_allreduce(
            input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
            grad_output_buffer=grad_output_buffer, wgrad_deferral_limit=wgrad_deferral_limit, tp_group=tp_group)
    return _LinearWithSequenceParallel.apply(input, weight, bias, tp_group)


class RowParallelLinear(tensor_parallel.RowParallelLinear):
    """megatron-core's RowParallelLinear whose sequence-parallel reduce-scatter also runs off CUDA.
    Only the case megallm uses is supported: input already split, no bias."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        assert self.input_is_parallel and self.bias is None, "megallm's row-parallel layers take split input, no bias"

    def forward(self, input_: torch.Tensor):
        if input_.is_cuda or not self.sequence_parallel:
            return super().forward(input_)
        output_parallel = self._forward_impl(
            input=input_, weight=self.weight, bias=None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
            sequence_parallel=False, tp_group=None, grad_output_buffer=None)
        return reduce_scatter_to_sequence_parallel_region(output_parallel, self.tp_group), None


# ------------------------------------------------------------------------------------------------
# Replicated parameters' gradients


def mark_sequence_parallel(module: nn.Module) -> None:
    """Tag a module's parameters as replicated over tp but fed by this rank's tokens only
    (Megatron's `sequence_parallel` parameter attribute), for `allreduce_sequence_parallel_grads`."""
    for p in module.parameters():
        p.sequence_parallel = True


def allreduce_sequence_parallel_grads(params: Iterable[nn.Parameter], group=None) -> None:
    """Sum the gradients of `sequence_parallel` parameters over the tensor-parallel group (one
    coalesced all-reduce), so every tp rank holds the full gradient of its replicated norm weights,
    as without sequence parallelism. Call after backward (and the data-parallel reduction, which
    commutes with it) and before the gradient norm. The gradient is `main_grad` where an optimizer
    keeps one, else `.grad` (Megatron's finalize_model_grads does this on main_grad)."""
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    if group.size() == 1:
        return
    grads = [g for p in params if getattr(p, "sequence_parallel", False)
             for g in [getattr(p, "main_grad", None) if getattr(p, "main_grad", None) is not None else p.grad]
             if g is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for g, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(reduced)
