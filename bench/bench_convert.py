#!/usr/bin/env python3
"""Peak memory of checkpoint conversion on a ~1.1B-parameter LLaMA (TinyLlama's shape: 22 layers,
hidden 2048, ffn 5632, 32 heads, 4 key/value groups, vocab 32000) with random bf16 weights.

    python bench/bench_convert.py [--out-dir bench/out/convert] [--max-shard-size 1GB] [--keep]

Writes the random HuggingFace checkpoint straight to safetensors shards (no transformers model is
built), then runs `tools/convert_checkpoint.py` hf -> megallm (fp32) and megallm -> hf (bf16) as
child processes, each reporting its own peak RSS (VmHWM; see PEAK_WRAPPER for why not ru_maxrss).
The baseline is the same tool's peak with --help (python, torch and safetensors
imported, nothing converted). Ratios are to the largest single tensor and to the largest file
read or written. The round trip is checked bit-exact on two tensors, and every file is deleted
afterwards unless --keep (the three checkpoints take ~9 GB).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from megallm.checkpoint.convert import expected_shapes, target_config  # noqa: E402
from megallm.checkpoint.hf_config import hf_config_from_model  # noqa: E402
from megallm.checkpoint.hf_files import parse_size, write_hf_weights  # noqa: E402
from megallm.config import ModelConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ModelConfig(num_layers=22, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=32,
                    num_query_groups=4, vocab_size=32000, max_position_embeddings=2048)


def write_random_hf(out: Path, max_shard_size: int) -> int:
    """Returns the parameter count."""
    out.mkdir(parents=True)
    shapes = expected_shapes(target_config(MODEL))
    gen = torch.Generator().manual_seed(0)
    write_hf_weights(out, shapes, lambda name: torch.randn(shapes[name], generator=gen) * 0.02,
                     torch.bfloat16, max_shard_size)
    (out / "config.json").write_text(json.dumps(hf_config_from_model(MODEL, "bf16")))
    return sum(torch.Size(s).numel() for s in shapes.values())


# Runs the tool in this child and records the child's own peak RSS. Not ru_maxrss: Linux carries
# the parent's peak into a child's ru_maxrss at exec, so it can never report less than this
# (weights-generating) process held; VmHWM belongs to the child's own address space.
PEAK_WRAPPER = """
import runpy, sys
tool, report = sys.argv[1], sys.argv[2]
sys.argv = [tool] + sys.argv[3:]
code = 0
try:
    runpy.run_path(tool, run_name="__main__")
except SystemExit as e:
    code = e.code or 0
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
open(report, "w").write(hwm.split()[1])
sys.exit(code)
"""


def measured(args: list[str], report: Path) -> tuple[float, float, float]:
    """(peak RSS MB, wall s, cpu s) of one tools/convert_checkpoint.py run in a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", PEAK_WRAPPER, str(ROOT / "tools/convert_checkpoint.py"),
                             str(report), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"tools/convert_checkpoint.py {' '.join(args)} exited {os.waitstatus_to_exitcode(status)}")
    return int(report.read_text()) / 1024, time.perf_counter() - start, usage.ru_utime + usage.ru_stime


def largest_file_mb(directory: Path) -> float:
    return max(p.stat().st_size for p in directory.rglob("*.safetensors")) / 1e6


def same_tensor(a: Path, b: Path, name: str) -> bool:
    def read(directory):
        index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
        with safe_open(str(directory / index[name]), framework="pt") as f:
            return f.get_tensor(name)

    return torch.equal(read(a), read(b))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench/out/convert")
    p.add_argument("--max-shard-size", default="1GB", help="HuggingFace shard size, both directions")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = p.parse_args()
    out = args.out_dir
    shutil.rmtree(out, ignore_errors=True)
    try:
        start = time.perf_counter()
        n = write_random_hf(out / "hf", parse_size(args.max_shard_size))
        print(f"random checkpoint: {n / 1e9:.2f}B parameters in {time.perf_counter() - start:.0f} s")
        baseline, _, _ = measured(["--help"], out / "peak")
        to_mg, t1, c1 = measured(["--from", "hf", "--to", "megallm", "--input", str(out / "hf"),
                                  "--output", str(out / "mg"), "--tp", "2", "--pp", "2"], out / "peak")
        to_hf, t2, c2 = measured(["--from", "megallm", "--to", "hf", "--input", str(out / "mg"),
                                  "--output", str(out / "hf_back"), "--dtype", "bf16",
                                  "--max-shard-size", args.max_shard_size], out / "peak")
        exact = all(same_tensor(out / "hf", out / "hf_back", k)
                    for k in ("lm_head.weight", "model.layers.7.mlp.up_proj.weight"))
        tensor_mb = MODEL.vocab_size * MODEL.hidden_size * 4 / 1e6  # the fp32 embedding / head
        rows = [("hf (bf16) -> megallm (fp32)", to_mg, t1, c1, largest_file_mb(out / "hf"),
                 largest_file_mb(out / "mg")),
                ("megallm (fp32) -> hf (bf16)", to_hf, t2, c2, largest_file_mb(out / "mg"),
                 largest_file_mb(out / "hf_back"))]
        print(f"\nbaseline (imports only): {baseline:.0f} MB; largest tensor (fp32): {tensor_mb:.0f} MB; "
              f"round trip bit-exact: {exact}\n")
        print("| conversion | peak RSS MB | above baseline MB | / largest tensor | largest file in / out MB "
              "| / largest file | wall s | cpu s |")
        print("|---|---|---|---|---|---|---|---|")
        for name, rss, secs, cpu, f_in, f_out in rows:
            above = rss - baseline
            print(f"| {name} | {rss:.0f} | {above:.0f} | {above / tensor_mb:.1f}x | {f_in:.0f} / {f_out:.0f} "
                  f"| {above / max(f_in, f_out):.2f}x | {secs:.0f} | {cpu:.0f} |")
        return 0 if exact else 1
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
