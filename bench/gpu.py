#!/usr/bin/env python3
"""One GPU, a slice of LLaMA2-70B: megallm's training iteration against HuggingFace's.

    python bench/gpu.py [--layers 2] [--global-batch 8] [--iters 6] [--warmup 2] [--json-out F]
    python bench/gpu.py --tiny          # the same code path on configs/tiny.yaml's shape (CPU smoke)

The slice: hidden 8192, ffn 28672, 64 heads / 8 query groups, vocab 32000, seq 4096, --layers
decoder layers, micro batch 1, --global-batch micro-batches per iteration, tp = pp = dp = 1.
Each side runs forward + backward of every micro-batch, clipping and one AdamW step, with bf16
autocast over fp32 weights (megallm's CUDA path). Variants run one after another in this process
(two 2-layer slices with Adam states do not fit on one 80 GB card together), in the order
megallm, HF, megallm, HF: the repeats show the drift. The second megallm run sets
MEGALLM_NO_FUSED=1 (apex/TE RMSNorm off) when the first had fused kernels; otherwise it is a
plain repeat.

Model FLOPs per token are the planner's 6N + 12*L*h*s (N: the layers' and the output head's
matrix parameters); MFU is against the device's dense bf16 peak from megallm.planner.devices.
"""

from __future__ import annotations

import argparse
import gc
import json
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

import torch  # noqa: E402

from megallm.config import Config, load_yaml  # noqa: E402

SLICE = dict(hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64, num_query_groups=8,
             vocab_size=32000, max_position_embeddings=4096)


def slice_config(layers: int, global_batch: int, seq_length: int = 4096, tiny: bool = False,
                 log_dir: str = "runs/gpu_bench") -> Config:
    cfg = load_yaml(HERE.parent / "configs" / "tiny.yaml") if tiny else Config()
    if not tiny:
        for name, value in SLICE.items():
            setattr(cfg.model, name, value)
        cfg.model.num_layers = layers
        cfg.training.seq_length = seq_length
    cfg.training.micro_batch_size, cfg.training.global_batch_size = 1, global_batch
    cfg.training.train_iters, cfg.training.eval_interval = 1000, 0
    cfg.logging.tensorboard, cfg.logging.log_dir = False, log_dir
    return cfg


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    """Dense bf16 peak of the device, from the planner's table, and which entry it is."""
    from megallm.planner.devices import DEVICES

    if device.type != "cuda":
        return None, "cpu (no peak)"
    name = torch.cuda.get_device_name(device)
    key = "h100-94gb" if "NVL" in name else "h200-141gb" if "H200" in name else "h100-80gb" if "H100" in name \
        else "a100-80gb" if "A100" in name else None
    if key is None:
        return None, f"{name}: not in megallm.planner.devices"
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


def random_batch(cfg: Config, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform random tokens, like megallm's synthetic dataset (the HF side has no data pipeline)."""
    t = cfg.training
    g = torch.Generator().manual_seed(cfg.training.seed * 1000 + step)
    text = torch.randint(0, cfg.model.vocab_size, (t.global_batch_size, t.seq_length + 1), generator=g)
    return text[:, :-1].to(device), text[:, 1:].to(device)


def run_variant(name: str, cfg: Config, device: torch.device, iters: int, warmup: int, env: dict) -> dict:
    from side_by_side import HFTrainer, timed

    from megallm import platform

    os.environ.update(env)
    platform.fused_rms_norm.cache_clear()  # MEGALLM_NO_FUSED is read once per process otherwise
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    if name == "megallm":
        from megallm.training.loop import Trainer

        runner = Trainer.build(cfg, 1)
        step = lambda i: runner.train_step()["loss"]  # noqa: E731
        extras = platform.extras()
    else:
        runner = HFTrainer(cfg, device)
        step = lambda i: runner.step(*random_batch(cfg, i, device))  # noqa: E731
        extras = {}
    build_s = time.perf_counter() - start
    seconds, losses = [], []
    for i in range(warmup + iters):
        loss, s = timed(lambda: step(i), device)
        losses.append(loss)
        if i >= warmup:
            seconds.append(s)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    runner = step = None  # drop the model and its closures before measuring the next variant
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for key in env:
        os.environ.pop(key, None)
    return {"name": name, "env": env, "build_s": build_s, "seconds": seconds, "losses": losses,
            "peak_memory_bytes": peak, "extras": extras}


def summarize(result: dict, flops_per_iteration: float, tokens_per_iteration: int, peak: float | None) -> dict:
    from benchlib import median, spread

    s = median(result["seconds"])
    tflops = flops_per_iteration / s / 1e12
    return {**result, "median_s": s, "spread": spread(result["seconds"]), "tokens_per_s": tokens_per_iteration / s,
            "tflops": tflops, "mfu": tflops * 1e12 / peak if peak else None}


def device_info(device: torch.device) -> dict:
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import megatron.core

        info["megatron_core"] = megatron.core.__version__
    except ImportError:
        info["megatron_core"] = "not installed"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                    cuda=torch.version.cuda)
        try:
            info["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
        except (AttributeError, RuntimeError) as e:
            info["nccl"] = f"unavailable: {e}"
    else:
        info.update(name="cpu", nccl="n/a (CPU)")
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the 70B shape (2 to 4)")
    parser.add_argument("--global-batch", type=int, default=8, help="micro-batches (of 1 sequence) per iteration")
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=6, help="timed iterations per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per variant")
    parser.add_argument("--variants", default="megallm,hf,megallm,hf")
    parser.add_argument("--tiny", action="store_true", help="configs/tiny.yaml's shape instead (CPU smoke run)")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    if not 1 <= args.layers <= 8 or args.iters < 1 or args.warmup < 0:
        parser.error("--layers must be 1..8, --iters >= 1, --warmup >= 0")
    warnings.filterwarnings("ignore")

    from side_by_side import world_of_one

    from megallm import platform
    from megallm.planner.throughput import model_flops_per_token

    logs = tempfile.TemporaryDirectory(prefix="megallm_gpu_bench_")  # the trainer's metrics files: not wanted
    cfg = slice_config(args.layers, args.global_batch, args.seq_length, args.tiny, logs.name)
    device = platform.device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    world_of_one()
    info = device_info(device)
    peak, peak_source = peak_flops(device)
    tokens = cfg.training.global_batch_size * cfg.training.seq_length
    flops = model_flops_per_token(cfg) * tokens
    report = {"date": str(date.today()), "device": info, "peak_flops": peak, "peak_source": peak_source,
              "gemm_8192_tflops": gemm_tflops(device), "config": cfg.to_dict(), "tokens_per_iteration": tokens,
              "model_flops_per_token": model_flops_per_token(cfg), "iters": args.iters, "warmup": args.warmup,
              "variants": []}
    print(f"device: {info}\ngemm 8192^3 bf16: {report['gemm_8192_tflops']} TFLOP/s; peak {peak} ({peak_source})",
          flush=True)
    fused_seen = False
    for name in args.variants.split(","):
        env = {}
        if name == "megallm" and fused_seen:
            env = {"MEGALLM_NO_FUSED": "1"}
        try:
            result = summarize(run_variant(name, cfg, device, args.iters, args.warmup, env), flops, tokens, peak)
        except torch.OutOfMemoryError as e:  # say so in the report instead of losing the other variants
            result = {"name": name, "env": env, "error": f"out of memory: {str(e).splitlines()[0]}"}
            gc.collect()
            torch.cuda.empty_cache()
        fused_seen = fused_seen or bool(result.get("extras", {}).get("fused_rms_norm"))
        report["variants"].append(result)
        print(json.dumps({k: v for k, v in result.items() if k not in ("seconds", "losses")}), flush=True)
    print(render(report))
    logs.cleanup()
    if args.json_out:
        tmp = Path(args.json_out).with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(args.json_out)
    return 0


def render(report: dict) -> str:
    """The variants as a markdown table (bench/RESULTS.md's GPU section is built from it)."""
    from benchlib import table

    rows = []
    for v in report["variants"]:
        if "error" in v:
            rows.append([v["name"], "-", "-", "-", "-", "-", v["error"]])
            continue
        fused = "MEGALLM_NO_FUSED=1" if v["env"] else ("fused RMSNorm" if v["extras"].get("fused_rms_norm") else
                                                         "unfused" if v["name"] == "megallm" else "HF eager ops")
        mem = f"{v['peak_memory_bytes'] / 2**30:.1f}" if v["peak_memory_bytes"] else "-"
        rows.append([v["name"], fused, f"{v['median_s'] * 1e3:.0f} ({v['spread']:.1%})", f"{v['tokens_per_s']:,.0f}",
                     f"{v['tflops']:.1f}", f"{v['mfu']:.1%}" if v["mfu"] else "-", mem])
    return table(["implementation", "kernels", "iteration ms (spread)", "tokens/s", "TFLOP/s", "MFU", "peak GiB"], rows)


if __name__ == "__main__":
    sys.exit(main())
