"""RMSNorm that keeps only its input and 1/rms for backward.

    y = weight * (x / sqrt(mean(x^2) + eps))        statistics in fp32, output in x's dtype

Written out as an autograd Function because torch's composite RMSNorm (and the module this file
replaces) lets autograd save x in fp32, the normalised x and the output: 3h values per token instead
of h plus one fp32 scalar. On CUDA apex's or transformer-engine's fused kernel is used when it
imports (they save the same input + rstd); the Function is its exact CPU twin.
"""

from __future__ import annotations

import torch
from torch import nn

from megallm import platform


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        x32 = x.float()
        normed = (x32 * rstd).to(x.dtype)  # recomputed: one multiply instead of h saved values per token
        grad_weight = (grad_out * normed).sum_to_size(weight.shape) if ctx.needs_input_grad[1] else None
        # The same operations, in the same order, as autograd's backward of the forward above
        # (mul, rsqrt, mean, pow), so fp32 results equal the composite module's.
        g = (grad_out * weight).float()
        grad_rstd = (g * x32).sum(-1, keepdim=True)
        grad_var = grad_rstd * (-0.5 * rstd.pow(3))
        grad_sq = grad_var.expand_as(x32) / x32.shape[-1]
        grad_x = g * rstd + grad_sq * (2.0 * x32)
        return grad_x.to(x.dtype), grad_weight, None


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, statistics in fp32 whatever the parameters' dtype."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)


def make_norm(dim: int, eps: float, dtype: torch.dtype = torch.float32) -> nn.Module:
    fused = platform.fused_rms_norm()
    if fused is None:
        return RMSNorm(dim, eps, dtype)
    return fused(dim, eps=eps).to(dtype)
