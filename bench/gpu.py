#!/usr/bin/env python3
"""`make gpu-check`: one command that says what one GPU does with megallm's LLaMA2-70B shapes.

    python bench/gpu.py [--layers 2] [--global-batch 8] [--iters 4] [--warmup 1] [--json-out F]
    python bench/gpu.py --smoke         # the same code on configs/tiny.yaml's shape (CPU, seconds)

It reports, in this order (each part can be picked with --parts):
 1. versions   torch, CUDA, cuDNN, NCCL, megatron-core, transformers, apex, transformer-engine,
               flash-attn, and the kernels megallm will use (fused RMSNorm from apex or TE, SDPA's
               backends as torch has them enabled); megallm.platform decides, nothing is imported
               that it would not import itself.
 2. sdpa       which scaled_dot_product_attention backend runs for the per-rank attention of the
               70B layer (tp 1: 64 query heads / 8 KV groups; tp 8: 8 / 1), head dim 128, seq
               4096, micro batch 1 and 2, bf16, causal, GQA through enable_gqa, with q, k, v laid
               out exactly as megallm.model.llama.Attention hands them over. Each backend is tried
               alone under torch.nn.attention.sdpa_kernel (forward + backward; the reason torch
               gives when it refuses), and the default dispatch's choice is read from the
               profiler's aten op names (plus the CUDA kernels' names on a GPU).
 3. activations one decoder layer of the 70B shape (tp 1, --act-seq tokens, the slice's micro
               batch): the bytes autograd saves for backward (saved_tensors_hooks, distinct
               storages, weights and RoPE tables left out, as tests/distributed/memory_worker.py
               counts them), without recompute, with selective recompute (layernorm + swiglu;
               mlp) and with full recompute, per token and against the planner's
               megallm.planner.memory.layer_activation_bytes.
 4. train      a slice of the 70B model: hidden 8192, ffn 28672, 64 heads / 8 query groups, vocab
               32000, seq 4096, --layers decoder layers, micro batch 1, --global-batch
               micro-batches per iteration, tp = pp = dp = 1, bf16 parameters (training.bf16:
               fp32 main grads, masters and Adam moments), constant learning rate 1.5e-4 (the 70B
               recipe's peak, no warmup). Loss (finite, falling), tokens/s, MFU, peak memory
               against the planner's plan for the same config, and HuggingFace LlamaForCausalLM
               on the same slice (fp32 weights under bf16 autocast, HF's usual mixed precision)
               side by side. Variants run one after another in this process (two slices with
               Adam states need not fit together), in the order megallm, HF, megallm, HF: the
               repeats show the drift. The second megallm run sets MEGALLM_NO_FUSED=1 (apex/TE
               RMSNorm off) when the first had fused kernels; otherwise it is a plain repeat.

Model FLOPs per token are the planner's 6N + 12*L*h*s (N: the layers' and the output head's
matrix parameters); MFU is against the device's dense bf16 peak from megallm.planner.devices.
Without CUDA only --smoke runs (tiny shapes, the same code path); the JSON it writes is marked
"smoke": true. Expected to take a few minutes of the 10 the issue allows on one H100/H200 (an
estimate: the session that wrote this had no GPU; --smoke takes well under a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
import warnings
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repo root: megallm
sys.path.insert(0, str(HERE))  # side_by_side, benchlib (also when copied beside megallm's checkout)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from megallm.config import Config, load_yaml  # noqa: E402
from megallm.planner.saved_tensors import SavedTensorMeter  # noqa: E402  (the measured-memory test's meter)
from megallm.preflight.facts import dist_version  # noqa: E402  (what preflight compares across nodes)

SLICE = dict(hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64, num_query_groups=8,
             vocab_size=32000, max_position_embeddings=4096)
SLICE_LR = 1.5e-4  # configs/llama2_70b.yaml's peak learning rate
PARTS = ("versions", "sdpa", "activations", "train")
# Recompute settings of the activation probe (config overrides), in the order reported.
RECOMPUTE_MODES = {
    "none": {},
    "selective (layernorm, swiglu)": {"recompute_granularity": "selective",
                                      "recompute_modules": ["layernorm", "swiglu"]},
    "selective (mlp)": {"recompute_granularity": "selective", "recompute_modules": ["mlp"]},
    "full (uniform, 1 layer)": {"recompute_granularity": "full", "recompute_method": "uniform",
                                "recompute_num_layers": 1},
}
# aten ops that scaled_dot_product_attention dispatches to, and the backend each one is.
SDPA_OPS = (("cudnn_attention", "CUDNN_ATTENTION"), ("efficient_attention", "EFFICIENT_ATTENTION"),
            ("flash_attention", "FLASH_ATTENTION"), ("fused_attention_overrideable", "OVERRIDEABLE"),
            ("attention_math", "MATH"))
SDPA_KERNEL_WORDS = ("flash", "fmha", "attention", "attn", "sdpa", "cudnn")


def slice_config(layers: int, global_batch: int, seq_length: int | None = None, smoke: bool = False,
                 log_dir: str = "runs/gpu_bench") -> Config:
    """The 70B slice (or, smoke, configs/tiny.yaml's shape) with `layers` decoder layers, bf16
    parameters and a constant learning rate without warmup (a few iterations must move).
    seq_length None: 4096 (smoke: tiny's 128)."""
    cfg = load_yaml(HERE.parent / "configs" / "tiny.yaml") if smoke else Config()
    if not smoke:
        for name, value in SLICE.items():
            setattr(cfg.model, name, value)
        cfg.training.seq_length = 4096
        cfg.optimizer.lr = SLICE_LR
    if seq_length:
        cfg.training.seq_length = seq_length
    cfg.model.num_layers = layers
    cfg.training.bf16 = True  # megallm's CUDA precision, natively (no autocast); on the CPU too in --smoke
    cfg.training.micro_batch_size, cfg.training.global_batch_size = 1, global_batch
    cfg.training.train_iters, cfg.training.eval_interval = 1000, 0
    o = cfg.optimizer
    o.lr_warmup_iters, o.lr_warmup_fraction, o.lr_decay_style = 0, None, "constant"  # HF steps at a constant lr
    o.min_lr = min(o.min_lr, o.lr / 10)  # unused at a constant lr, but megatron's scheduler wants min <= max
    cfg.logging.tensorboard, cfg.logging.log_dir = False, log_dir
    return cfg


def planner_device(device: torch.device) -> str | None:
    """The planner's name for this device (megallm.planner.devices), or None for an unknown GPU."""
    from megallm.planner.devices import detect_device

    if device.type != "cuda":
        return "cpu"
    props = torch.cuda.get_device_properties(device)
    return detect_device(props.name, props.total_memory)


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    """Dense bf16 peak of the device, from the planner's table, and which entry it is."""
    from megallm.planner.devices import DEVICES

    if device.type != "cuda":
        return None, "cpu (no peak)"
    key = planner_device(device)
    if key is None:
        return None, f"{torch.cuda.get_device_name(device)}: not in megallm.planner.devices"
    return DEVICES[key].peak_bf16_flops, DEVICES[key].description


def gemm_tflops(device: torch.device, n: int = 8192, repeats: int = 10) -> float | None:
    """The device's achievable bf16 GEMM rate on random n^3 products (median of repeats): the
    practical ceiling beside the datasheet peak."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e12


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# 1. versions and kernels


def versions() -> dict:
    import platform as py_platform

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": py_platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": cudnn, "megatron_core": dist_version("megatron-core", "megatron_core"),
        "transformers": dist_version("transformers"), "apex": dist_version("apex"),
        "transformer_engine": dist_version("transformer-engine", "transformer_engine", "transformer-engine-torch"),
        "flash_attn": dist_version("flash-attn", "flash_attn"),
    }


def kernels() -> dict:
    """The kernels megallm's model will use here: megallm.platform's answer (it imports apex / TE
    only on CUDA, and only when they are installed), the RMSNorm class make_norm builds, and
    SDPA's backends as torch reports them enabled/built."""
    from megallm import platform

    fused = platform.fused_rms_norm()
    info = {**platform.extras(),
            "rms_norm": f"{fused.__module__}.{fused.__qualname__}" if fused else "megallm.model.norm.RMSNorm",
            "flash_attn_package": dist_version("flash-attn", "flash_attn") is not None}
    for flag in ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "cudnn_sdp_enabled", "math_sdp_enabled"):
        fn = getattr(torch.backends.cuda, flag, None)
        info[flag] = bool(fn()) if fn is not None else None
    built = getattr(torch.backends.cuda, "is_flash_attention_available", None)
    info["flash_attention_built"] = bool(built()) if built is not None and torch.cuda.is_available() else False
    return info


# ------------------------------------------------------------------------------------------------
# 2. which SDPA backend runs


def megallm_qkv(b: int, s: int, heads: int, groups: int, head_dim: int, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as megallm.model.llama.Attention.forward hands them to SDPA: the fused
    [s, b, (heads + 2 groups) d] GEMM output split, viewed and permuted to [b, heads, s, d]
    (strided, not contiguous), q and k through RoPE. Returned as leaves that need grad, with the
    strides kept, so a timing covers the attention alone."""
    from megallm.model.llama import RotaryEmbedding, apply_rotary

    with torch.no_grad():
        qkv = torch.randn(s, b, (heads + 2 * groups) * head_dim, dtype=dtype, device=device)
        q, k, v = qkv.split([heads * head_dim, groups * head_dim, groups * head_dim], dim=-1)
        q = q.view(s, b, heads, head_dim).permute(1, 2, 0, 3)
        k = k.view(s, b, groups, head_dim).permute(1, 2, 0, 3)
        v = v.view(s, b, groups, head_dim).permute(1, 2, 0, 3)
        cos, sin = RotaryEmbedding(head_dim, 10000.0)(s, device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    return tuple(x.detach().requires_grad_(True) for x in (q, k, v))


def sdpa_fwd_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Forward and backward of megallm's attention call: F.scaled_dot_product_attention, causal,
    enable_gqa, no dropout (LLaMA2's attention_dropout 0)."""
    import torch.nn.functional as F

    for x in (q, k, v):
        x.grad = None
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out.backward(torch.ones_like(out))
    if not all(torch.isfinite(x.grad).all() for x in (q, k, v)):
        raise AssertionError("non-finite attention gradient")


def backend_of(op_names) -> str | None:
    """The SDPA backend named by the aten ops a profile saw (forward first), else None."""
    for name in op_names:
        for key, backend in SDPA_OPS:
            if name.startswith("aten::_scaled_dot_product") and key in name:
                return backend
    return None


def profiled_ops(fn, device: torch.device) -> tuple[list[str], list[str]]:
    """(aten op names, CUDA kernel names) that fn() ran, in first-seen order, from torch.profiler;
    CPU activity alone when CUDA's (CUPTI) cannot start."""
    from side_by_side import synchronize
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with profile(activities=activities) as prof:
            fn()
            synchronize(device)
    except RuntimeError:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
            synchronize(device)
    events = prof.events()
    ops = list(dict.fromkeys(e.name for e in events if e.name.startswith("aten::")))
    on_gpu = [e.name for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels_seen = list(dict.fromkeys(n[:120] for n in on_gpu if any(w in n.lower() for w in SDPA_KERNEL_WORDS)))
    return ops, kernels_seen


def sdpa_shapes(cfg: Config, micro_batches=(1, 2)) -> list[dict]:
    """The per-rank attention shapes of cfg's model at tp 1 and at tp = query groups (one KV group
    per rank, the most tensor parallelism GQA allows; 8 for LLaMA2-70B)."""
    m = cfg.model
    return [{"tp": tp, "heads": m.num_attention_heads // tp, "groups": m.num_query_groups // tp,
             "head_dim": m.kv_channels, "seq": cfg.training.seq_length, "micro_batch": b}
            for tp in sorted({1, m.num_query_groups}) for b in micro_batches]


def sdpa_probe(shapes: list[dict], device: torch.device, dtype: torch.dtype = torch.bfloat16,
               repeats: int = 3) -> list[dict]:
    """For each shape: every backend alone (ok with forward+backward ms, or torch's reason), and
    the backend (and CUDA kernels) the default dispatch runs."""
    from benchlib import median
    from side_by_side import timed
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [b for name, b in SDPBackend.__members__.items() if name not in ("ERROR", "OVERRIDEABLE")]
    rows = []
    for shape in shapes:
        qkv = megallm_qkv(shape["micro_batch"], shape["seq"], shape["heads"], shape["groups"], shape["head_dim"],
                          dtype, device)
        run = lambda: sdpa_fwd_bwd(*qkv)  # noqa: E731
        row = {**shape, "dtype": str(dtype).replace("torch.", ""), "backends": {}}
        for backend in backends:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    with sdpa_kernel([backend]):
                        run()  # warm-up (and the refusal, if any)
                        ms = median(timed(run, device)[1] for _ in range(repeats)) * 1e3
                    row["backends"][backend.name] = {"ok": True, "ms": ms}
                except (RuntimeError, AssertionError, NotImplementedError, ValueError) as e:
                    reasons = list(dict.fromkeys(str(w.message).strip().splitlines()[0][:200] for w in caught
                                                 if str(w.message).strip()))
                    row["backends"][backend.name] = {"ok": False, "error": first_line(e), "reasons": reasons[:8]}
            free_memory(device)
        try:
            run()  # warm-up outside the profile
            ops, kernels_seen = profiled_ops(run, device)
            row["default"] = backend_of(ops) or "unknown"
            row["default_ops"] = [o for o in ops if "scaled_dot_product" in o or "attention" in o]
            row["default_kernels"] = kernels_seen[:6]
            row["default_ms"] = median(timed(run, device)[1] for _ in range(repeats)) * 1e3
        except (RuntimeError, AssertionError) as e:
            row["default"], row["default_error"] = "error", first_line(e)
        qkv = run = None
        free_memory(device)
        rows.append(row)
        ok = [name for name, r in row["backends"].items() if r["ok"]]
        print(f"sdpa tp {shape['tp']} heads {shape['heads']}/{shape['groups']} b {shape['micro_batch']} "
              f"s {shape['seq']}: default {row['default']}; runnable alone: {', '.join(ok) or 'none'}", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------
# 3. activation bytes of one decoder layer




def layer_saved_bytes(cfg: Config, device: torch.device, profile_sdpa: bool = False) -> dict:
    """One decoder layer of cfg's model (tp 1) built as the engine builds it (a LlamaChunk without
    embedding or head, megallm's initialisation, cfg's recompute settings), run forward on a
    [s, b, h] input that needs grad, as the layer after the embedding sees it. Returns the bytes
    autograd saved by the end of the forward (the layer input included; weights and the RoPE
    tables, which the planner counts once per chunk, left out), after a backward that checks the
    gradients are finite."""
    from megatron.core import parallel_state

    from megallm import platform
    from megallm.model import recompute, weight_mapping
    from megallm.model.llama import LlamaChunk

    m, t = cfg.model, cfg.training
    chunk = LlamaChunk(cfg, 0, 1, pre_process=False, post_process=False, device=device,
                       tp_group=parallel_state.get_tensor_model_parallel_group()).to(device)
    weight_mapping.init_weights(chunk, cfg, 0)
    dtype = platform.resolved_params_dtype(cfg)
    gen = torch.Generator(device=device).manual_seed(t.seed)
    x = torch.randn(t.seq_length, t.micro_batch_size, m.hidden_size, device=device, dtype=dtype, generator=gen)
    x.requires_grad_(True)
    cos, sin = chunk.rotary(t.seq_length, device)
    exclude = {p.untyped_storage().data_ptr() for p in [*chunk.parameters(), *chunk.buffers(), cos, sin]}
    meter, out = SavedTensorMeter(exclude), {}

    def fwd_bwd():
        with meter.hooks():
            y = recompute.run_layers(chunk.layers, x, cos, sin, *chunk.recompute)
        out["saved"], out["peak"] = meter.current, meter.peak
        y.float().square().mean().backward()

    if profile_sdpa:
        ops, kernels_seen = profiled_ops(fwd_bwd, device)
        out["sdpa"], out["sdpa_kernels"] = backend_of(ops) or "unknown", kernels_seen[:4]
    else:
        fwd_bwd()
    assert meter.current == 0, f"{meter.current} saved bytes still held after backward"
    assert x.grad is not None and torch.isfinite(x.grad).all(), "non-finite gradient through the layer"
    return out


def activation_probe(cfg: Config, device: torch.device) -> list[dict]:
    """layer_saved_bytes for each RECOMPUTE_MODES entry against the planner's
    layer_activation_bytes for the same config (its layout at tp 1: fused norms, flash attention)."""
    import copy

    from megallm.config import apply_overrides
    from megallm.planner.devices import get_device
    from megallm.planner.layout import make_layout
    from megallm.planner.memory import layer_activation_bytes

    rows = []
    tokens = cfg.training.seq_length * cfg.training.micro_batch_size
    for name, overrides in RECOMPUTE_MODES.items():
        c = apply_overrides(copy.deepcopy(cfg), overrides)
        c.model.num_layers = 1
        try:
            measured = layer_saved_bytes(c, device, profile_sdpa=not overrides)
        except torch.OutOfMemoryError as e:
            rows.append({"mode": name, "error": f"out of memory: {first_line(e)}"})
            free_memory(device)
            continue
        layout = make_layout(c, 1, get_device(planner_device(device) or "h100-80gb"))
        planned = layer_activation_bytes(c, layout)
        row = {"mode": name, "overrides": overrides, "tokens": tokens, "saved_bytes": measured["saved"],
               "bytes_per_token": measured["saved"] / tokens, "planner_bytes_per_token": planned / tokens,
               "ratio": measured["saved"] / planned, "precision": layout.precision,
               **{k: v for k, v in measured.items() if k.startswith("sdpa")}}
        rows.append(row)
        free_memory(device)
        print(f"activations, {name}: {row['bytes_per_token']:,.1f} B/token saved, planner "
              f"{row['planner_bytes_per_token']:,.1f} (ratio {row['ratio']:.4f})", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------
# 4. training iterations, megallm and HF


class ZipfTokens(torch.utils.data.Dataset):
    """Seeded i.i.d. tokens with Zipf frequencies (p(rank k) ~ 1/(k+1), as words in text): item i is
    the same on every run and for both sides. megallm's synthetic data is uniform, where a freshly
    initialised model has nothing to learn in a few steps but smaller logits (on the 70B slice the
    loss would move by about the batch-to-batch noise); here the frequent tokens' embeddings give
    every position a common direction the output layer learns in the first steps, so a working
    iteration shows a clearly falling loss."""

    name = "zipf"

    def __init__(self, vocab_size: int, seq_length: int, seed: int, size: int = 1 << 30):
        self.seq_length, self.seed, self.size = seq_length, seed, size
        self.cdf = np.cumsum(1.0 / np.arange(1, vocab_size + 1))
        self.cdf /= self.cdf[-1]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> dict:
        rng = np.random.default_rng([self.seed, int(idx)])
        ids = np.minimum(np.searchsorted(self.cdf, rng.random(self.seq_length + 1)), len(self.cdf) - 1)
        text = torch.from_numpy(ids.astype(np.int64))
        return {"tokens": text[:-1], "labels": text[1:], "loss_mask": torch.ones(self.seq_length),
                "position_ids": torch.arange(self.seq_length)}


def dataset(cfg: Config) -> ZipfTokens:
    return ZipfTokens(cfg.model.vocab_size, cfg.training.seq_length, cfg.training.seed)


def global_batch(cfg: Config, data, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Iteration `step`'s global batch for the HF side: the samples megallm's sampler reads then
    (consecutive indices; megallm uses no shuffling of its own)."""
    from megallm.data import sampler

    g = cfg.training.global_batch_size
    tokens, labels = sampler.get_micro_batch(data, range(step * g, (step + 1) * g))
    return tokens.to(device), labels.to(device)


def run_variant(name: str, cfg: Config, device: torch.device, iters: int, warmup: int, env: dict) -> dict:
    from side_by_side import HFTrainer, timed

    from megallm import platform

    os.environ.update(env)
    platform.fused_rms_norm.cache_clear()  # MEGALLM_NO_FUSED is read once per process otherwise
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    data, start = dataset(cfg), time.perf_counter()
    if name == "megallm":
        from megallm.training.loop import Trainer

        runner = Trainer.build(cfg, 1, datasets=(data, None))
        step = lambda i: runner.train_step()["loss"]  # noqa: E731
        extras = platform.extras()
        dtype = str(runner.params[0].dtype).replace("torch.", "")
    else:
        runner = HFTrainer(cfg, device)
        step = lambda i: runner.step(*global_batch(cfg, data, i, device))  # noqa: E731
        extras = {}
        dtype = "fp32 + bf16 autocast" if device.type == "cuda" else "fp32"
    build_s = time.perf_counter() - start
    seconds, losses = [], []
    try:
        for i in range(warmup + iters):
            loss, s = timed(lambda: step(i), device)
            losses.append(loss)
            if i >= warmup:
                seconds.append(s)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    finally:
        if name == "megallm":
            runner.logger.close()
        runner = step = None  # drop the model and its closures before measuring the next variant
        free_memory(device)
        for key in env:
            os.environ.pop(key, None)
        platform.fused_rms_norm.cache_clear()
    finite = all(math.isfinite(x) for x in losses)
    return {"name": name, "env": env, "dtype": dtype, "build_s": build_s, "seconds": seconds, "losses": losses,
            "loss_finite": finite, "loss_falling": finite and len(losses) > 1 and losses[-1] < losses[0],
            "peak_memory_bytes": peak, "extras": extras}


def summarize(result: dict, flops_per_iteration: float, tokens_per_iteration: int, peak: float | None) -> dict:
    from benchlib import median, spread

    s = median(result["seconds"])
    tflops = flops_per_iteration / s / 1e12
    return {**result, "median_s": s, "spread": spread(result["seconds"]), "tokens_per_s": tokens_per_iteration / s,
            "tflops": tflops, "mfu": tflops * 1e12 / peak if peak else None}


def planned_memory(cfg: Config, device: torch.device) -> dict:
    """The planner's figures for the slice as configured on this device (one rank)."""
    from megallm.planner import PlanError, plan

    key = planner_device(device)
    try:
        p = plan(cfg, 1, key or "h100-80gb")
    except PlanError as e:
        return {"error": str(e)}
    st = p.stages[0]
    return {"device": key or "h100-80gb (stand-in: GPU not in the planner's table)",
            "model_state_bytes": st.model_state["total"], "activation_bytes": st.activations["total"],
            "activations": st.activations, "runtime_bytes": st.runtime_bytes, "total_bytes": p.total_bytes,
            "verdict": p.verdict, "tokens_per_s": p.tokens_per_s, "mfu": p.mfu}


def side_by_side_summary(variants: list[dict], plan: dict) -> dict:
    """megallm against HF (medians of the plain runs of each), and megallm's peak memory against
    the planner's model states + activations (its runtime allowance is the CUDA context and NCCL,
    outside torch's allocator)."""
    from benchlib import median

    ok = [v for v in variants if "error" not in v]
    mine = [v["tokens_per_s"] for v in ok if v["name"] == "megallm" and not v["env"]]
    hf = [v["tokens_per_s"] for v in ok if v["name"] == "hf"]
    out = {"megallm_tokens_per_s": median(mine) if mine else None, "hf_tokens_per_s": median(hf) if hf else None}
    out["megallm_over_hf"] = out["megallm_tokens_per_s"] / out["hf_tokens_per_s"] if mine and hf else None
    peaks = [v["peak_memory_bytes"] for v in ok if v["name"] == "megallm" and v["peak_memory_bytes"]]
    planned = plan.get("model_state_bytes", 0) + plan.get("activation_bytes", 0)
    out["megallm_peak_bytes"] = max(peaks) if peaks else None
    out["planned_bytes"] = planned or None
    out["peak_over_plan"] = max(peaks) / planned if peaks and planned else None
    return out


def device_info(device: torch.device) -> dict:
    v = versions()
    info = {"torch": v["torch"], "transformers": v["transformers"] or "not installed",
            "megatron_core": v["megatron_core"] or "not installed"}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                    cuda=torch.version.cuda)
        try:
            info["nccl"] = ".".join(str(x) for x in torch.cuda.nccl.version())
        except (AttributeError, RuntimeError) as e:
            info["nccl"] = f"unavailable: {e}"
    else:
        info.update(name="cpu", nccl="n/a (CPU)")
    return info


# ------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the 70B shape (2 to 4)")
    parser.add_argument("--global-batch", type=int, default=8, help="micro-batches (of 1 sequence) per iteration")
    parser.add_argument("--seq-length", type=int, default=None, help="default 4096 (--smoke: 128)")
    parser.add_argument("--act-seq", type=int, default=None,
                        help="tokens of the activation probe's layer (default: the slice's sequence)")
    parser.add_argument("--iters", type=int, default=4, help="timed iterations per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations per variant (their losses count)")
    parser.add_argument("--variants", default=None, help="default megallm,hf,megallm,hf (--smoke: megallm,hf)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"any of {', '.join(PARTS)}")
    parser.add_argument("--smoke", "--tiny", action="store_true",
                        help="configs/tiny.yaml's shape instead, on whatever device there is (the CPU smoke run)")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    if not 1 <= args.layers <= 8 or args.iters < 1 or args.warmup < 0 or set(parts) - set(PARTS):
        parser.error(f"--layers must be 1..8, --iters >= 1, --warmup >= 0, --parts from {', '.join(PARTS)}")
    if not torch.cuda.is_available() and not args.smoke:
        print("gpu.py: no CUDA device here. The 70B slice needs a GPU; `python bench/gpu.py --smoke` runs the "
              "same code on the CPU at configs/tiny.yaml's shape.", file=sys.stderr)
        return 2
    variants = args.variants or ("megallm,hf" if args.smoke else "megallm,hf,megallm,hf")
    warnings.filterwarnings("ignore")
    started = time.perf_counter()

    from side_by_side import world_of_one

    from megallm import platform
    from megallm.planner.throughput import model_flops_per_token

    logs = tempfile.TemporaryDirectory(prefix="megallm_gpu_bench_")  # the trainer's metrics files: not wanted
    cfg = slice_config(args.layers, args.global_batch, args.seq_length, args.smoke, logs.name)
    device = platform.device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    world_of_one()
    info = device_info(device)
    peak, peak_source = peak_flops(device)
    tokens = cfg.training.global_batch_size * cfg.training.seq_length
    flops = model_flops_per_token(cfg) * tokens
    report = {"date": str(date.today()), "smoke": args.smoke, "parts": parts, "device": info,
              "peak_flops": peak, "peak_source": peak_source,
              "gemm_8192_tflops": gemm_tflops(device) if "train" in parts else None, "config": cfg.to_dict(),
              "tokens_per_iteration": tokens, "model_flops_per_token": model_flops_per_token(cfg),
              "iters": args.iters, "warmup": args.warmup, "variants": []}
    print(f"device: {info}\ngemm 8192^3 bf16: {report['gemm_8192_tflops']} TFLOP/s; peak {peak} ({peak_source})",
          flush=True)

    if "versions" in parts:
        report["versions"], report["kernels"] = versions(), kernels()
        print(f"versions: {report['versions']}\nkernels: {report['kernels']}", flush=True)
    if "sdpa" in parts:
        report["sdpa"] = sdpa_probe(sdpa_shapes(cfg), device)
    if "activations" in parts:
        act_cfg = slice_config(1, cfg.training.micro_batch_size, args.act_seq or cfg.training.seq_length, args.smoke,
                               logs.name)
        report["activations"] = activation_probe(act_cfg, device)
    if "train" in parts:
        fused_seen = False
        for name in variants.split(","):
            env = {"MEGALLM_NO_FUSED": "1"} if name == "megallm" and fused_seen else {}
            try:
                result = summarize(run_variant(name, cfg, device, args.iters, args.warmup, env), flops, tokens, peak)
            except torch.OutOfMemoryError as e:  # say so in the report instead of losing the other variants
                result = {"name": name, "env": env, "error": f"out of memory: {first_line(e)}"}
                free_memory(device)
            fused_seen = fused_seen or bool(result.get("extras", {}).get("fused_rms_norm"))
            report["variants"].append(result)
            print(json.dumps({k: v for k, v in result.items() if k not in ("seconds", "extras")}), flush=True)
        report["plan"] = planned_memory(cfg, device)
        report["side_by_side"] = side_by_side_summary(report["variants"], report["plan"])
    report["wall_s"] = time.perf_counter() - started
    print(render(report))
    logs.cleanup()
    if args.json_out:
        tmp = Path(args.json_out).with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1, default=str))
        tmp.replace(args.json_out)
    return 0


# ------------------------------------------------------------------------------------------------


def render(report: dict) -> str:
    """The report as markdown (bench/RESULTS.md's GPU section is built from it): kernels, SDPA
    backends, activation bytes against the planner, then the variants table and the side by side."""
    blocks = (render_versions(report), render_sdpa(report), render_activations(report), render_variants(report))
    return "\n\n".join(b for b in blocks if b)


def render_versions(report: dict) -> str:
    v, k = report.get("versions"), report.get("kernels")
    if not v:
        return ""
    names = ", ".join(f"{name} {v[key] or '-'}" for name, key in (
        ("torch", "torch"), ("CUDA", "cuda"), ("cuDNN", "cudnn"), ("megatron-core", "megatron_core"),
        ("transformers", "transformers"), ("apex", "apex"), ("transformer-engine", "transformer_engine"),
        ("flash-attn", "flash_attn")))
    fused = (f"RMSNorm: {k['rms_norm']} (fused: {'yes' if k['fused_rms_norm'] else 'no'}); flash-attn package "
             f"{'present' if k['flash_attn_package'] else 'absent'} (megallm calls torch's SDPA, not it); SDPA "
             f"backends enabled: flash {k['flash_sdp_enabled']}, mem-efficient {k['mem_efficient_sdp_enabled']}, "
             f"cuDNN {k['cudnn_sdp_enabled']}, math {k['math_sdp_enabled']}")
    return f"Software: {names}.\n\nKernels: {fused}."


def render_sdpa(report: dict) -> str:
    from benchlib import table

    rows_in = report.get("sdpa")
    if not rows_in:
        return ""
    names = sorted({name for r in rows_in for name in r["backends"]})
    rows = []
    for r in rows_in:
        cells = []
        for name in names:
            b = r["backends"].get(name, {})
            refusal = "out of memory" if "OutOfMemory" in b.get("error", "") else "refused"
            cells.append(f"{b['ms']:.2f} ms" if b.get("ok") else refusal if b else "-")
        default = r["default"] + (f" ({r['default_ms']:.2f} ms)" if "default_ms" in r else "")
        rows.append([f"tp {r['tp']}: {r['heads']} q / {r['groups']} kv, b {r['micro_batch']}, s {r['seq']}",
                     default, *cells])
    kernels_seen = sorted({k for r in rows_in for k in r.get("default_kernels", [])})
    note = (f"SDPA backends for megallm's attention call ({rows_in[0]['dtype']}, causal, enable_gqa, head dim "
            f"{rows_in[0]['head_dim']}; forward + backward; each backend alone under sdpa_kernel, 'refused' with "
            "torch's reasons in the JSON):")
    text = [note, "", table(["per-rank shape", "default dispatch", *names], rows)]
    if kernels_seen:
        text += ["", "CUDA kernels of the default dispatch: " + "; ".join(f"`{k}`" for k in kernels_seen[:6]) + "."]
    return "\n".join(text)


def render_activations(report: dict) -> str:
    from benchlib import table

    rows_in = report.get("activations")
    if not rows_in:
        return ""
    rows = []
    for r in rows_in:
        if "error" in r:
            rows.append([r["mode"], "-", "-", r["error"]])
            continue
        rows.append([r["mode"], f"{r['bytes_per_token']:,.1f}", f"{r['planner_bytes_per_token']:,.1f}",
                     f"{r['ratio']:.4f}"])
    first = next((r for r in rows_in if "error" not in r), {})
    cfg = report["config"]["model"]
    head = (f"Saved activations of one decoder layer (h {cfg['hidden_size']}, ffn {cfg['ffn_hidden_size']}, "
            f"{cfg['num_attention_heads']} heads / {cfg['num_query_groups']} groups, tp 1, {first.get('tokens')} "
            f"tokens, {first.get('precision')}; SDPA backend in the layer: {first.get('sdpa', '-')}), bytes per "
            "token, against megallm.planner.memory.layer_activation_bytes:")
    return "\n".join([head, "", table(["recompute", "measured B/token", "planner B/token", "measured / planner"],
                                      rows)])


def render_variants(report: dict) -> str:
    from benchlib import table

    if not report.get("variants"):
        return ""
    rows = []
    for v in report["variants"]:
        if "error" in v:
            rows.append([v["name"], "-", "-", "-", "-", "-", "-", v["error"]])
            continue
        fused = "MEGALLM_NO_FUSED=1" if v["env"] else ("fused RMSNorm" if v["extras"].get("fused_rms_norm") else
                                                         "unfused" if v["name"] == "megallm" else "HF eager ops")
        mem = f"{v['peak_memory_bytes'] / 2**30:.1f}" if v["peak_memory_bytes"] else "-"
        losses = v.get("losses") or []
        loss = f"{losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "-"
        if losses and not v.get("loss_falling", True):
            loss += " (not falling)"
        rows.append([v["name"], fused, f"{v['median_s'] * 1e3:.0f} ({v['spread']:.1%})", f"{v['tokens_per_s']:,.0f}",
                     f"{v['tflops']:.1f}", f"{v['mfu']:.1%}" if v["mfu"] else "-", mem, loss])
    text = [table(["implementation", "kernels", "iteration ms (spread)", "tokens/s", "TFLOP/s", "MFU", "peak GiB",
                   "loss first -> last"], rows)]
    s, p = report.get("side_by_side"), report.get("plan")
    if s and s.get("megallm_over_hf"):
        text += ["", f"megallm / HF tokens/s: {s['megallm_over_hf']:.2f} ({s['megallm_tokens_per_s']:,.0f} against "
                     f"{s['hf_tokens_per_s']:,.0f}, medians of the plain runs)."]
    if p and "error" not in p:
        line = (f"Planner ({p['device']}): model states {p['model_state_bytes'] / 2**30:.2f} GiB + activations "
                f"{p['activation_bytes'] / 2**30:.2f} GiB (+ {p['runtime_bytes'] / 2**30:.0f} GiB runtime allowance), "
                f"predicted {p['tokens_per_s']:,.0f} tokens/s at {p['mfu']:.1%} MFU")
        if s and s.get("peak_over_plan"):
            line += (f"; megallm's measured peak (torch allocator) {s['megallm_peak_bytes'] / 2**30:.2f} GiB = "
                     f"{s['peak_over_plan']:.2f} x states + activations")
        text += ["", line + "."]
    return "\n".join(text)


if __name__ == "__main__":
    sys.exit(main())
