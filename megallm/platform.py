"""Where we run: CUDA + NCCL with optional fused kernels, or CPU + gloo.

The CPU path never imports transformer-engine or apex: they are GPU extras, switched on only when
CUDA is present and they import cleanly.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def backend(requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def params_dtype(requested: str = "auto") -> torch.dtype:
    """fp32 on CPU (exact comparisons, no bf16 GEMM speed to win); bf16 on CUDA."""
    if requested == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[requested]


def resolved_params_dtype(cfg) -> torch.dtype:
    """The dtype a run's parameters and activations have: --bf16 (Megatron's flag) wins over
    params_dtype. Gradients are accumulated, reduced and stepped in fp32 whatever this says."""
    return torch.bfloat16 if cfg.training.bf16 else params_dtype(cfg.training.params_dtype)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def fused_rms_norm():
    """apex's or transformer-engine's fused RMSNorm class on CUDA, else None."""
    if not torch.cuda.is_available() or os.environ.get("MEGALLM_NO_FUSED") == "1":
        return None
    if _importable("apex"):
        try:
            from apex.normalization import FusedRMSNorm

            return FusedRMSNorm
        except ImportError:
            pass
    if _importable("transformer_engine"):
        try:
            import transformer_engine.pytorch as te

            return te.RMSNorm
        except ImportError:
            pass
    return None


def extras() -> dict[str, bool]:
    """What the GPU path can use; printed at start so a run says which kernels it had."""
    cuda = torch.cuda.is_available()
    return {
        "cuda": cuda,
        "transformer_engine": cuda and _importable("transformer_engine"),
        "apex": cuda and _importable("apex"),
        "fused_rms_norm": fused_rms_norm() is not None,
        "flash_sdpa": cuda and torch.backends.cuda.flash_sdp_enabled(),
    }
