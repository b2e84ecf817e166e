"""megallm.model.norm.RMSNorm (an autograd Function that saves only its input and 1/rms) against
the composite RMSNorm it replaced, whose backward autograd derived; and what it saves."""

import pytest
import torch
from torch import nn

from megallm.model.norm import RMSNorm


class CompositeRMSNorm(nn.Module):
    """The module megallm used before: autograd saves x in fp32, the normalised x and more."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x):
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_equal_to_the_composite_norm(dtype):
    torch.manual_seed(0)
    new, old = RMSNorm(96, 1e-5, dtype), CompositeRMSNorm(96, 1e-5, dtype)
    with torch.no_grad():
        w = torch.randn(96).to(dtype)
        new.weight.copy_(w)
        old.weight.copy_(w)
    x = (3 * torch.randn(2, 16, 96)).to(dtype)
    x_new, x_old = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_new, y_old = new(x_new), old(x_old)
    grad = torch.randn_like(y_new)
    y_new.backward(grad)
    y_old.backward(grad)
    assert y_new.dtype == dtype
    assert torch.equal(y_new, y_old)
    assert torch.equal(x_new.grad, x_old.grad)
    assert torch.equal(new.weight.grad, old.weight.grad)


def test_saves_only_input_and_rstd():
    norm = RMSNorm(64, 1e-5, torch.bfloat16)
    x = torch.randn(4, 8, 64, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        norm(x)
    non_params = [t for t in saved if t.data_ptr() != norm.weight.data_ptr()]
    assert [(tuple(t.shape), t.dtype) for t in non_params] == [((4, 8, 64), torch.bfloat16),
                                                               ((4, 8, 1), torch.float32)]
