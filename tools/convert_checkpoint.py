"""Convert LLaMA checkpoints between HuggingFace and megallm, or between megallm layouts.

    python tools/convert_checkpoint.py --from hf --to megallm --input Llama-2-7b-hf --output ckpt/llama2_7b \\
        --tp 2 --pp 2
    python tools/convert_checkpoint.py --from megallm --to hf --input runs/x/ckpt --output llama-out --dtype bf16
    python tools/convert_checkpoint.py --from megallm --to megallm --input ckpt/a --output ckpt/b \\
        --tp 4 --pp 2 --vpp 2

megallm checkpoints hold HuggingFace-named logical tensors (whole, one file per layer, when written
here; as boxes written by each rank when training saved them), so every layout reads the same
files: --tp/--pp/--vpp are validated (tp divides heads, key/value groups, ffn and vocab; pp x vpp
divides the layers) and recorded as the intended layout, and megallm -> megallm is a
checksum-verified copy under the new layout. Outputs are model-only:
`launch/pretrain_llama2.py --load OUTPUT` starts a fresh optimizer and schedule. Tensors are
streamed one at a time (memory stays near one output shard or layer file).
Exit status: 0 done, 2 bad arguments or input (one line naming the file or key).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from megallm.checkpoint import CheckpointError, convert, read_meta
from megallm.checkpoint.hf_config import ConversionError
from megallm.checkpoint.hf_files import parse_size
from megallm.config import ConfigError


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", choices=["hf", "megallm"], required=True)
    p.add_argument("--to", dest="target", choices=["hf", "megallm"], required=True)
    p.add_argument("--input", required=True, type=Path,
                   help="HuggingFace directory (config.json + weights), or a megallm run directory (its latest "
                        "checkpoint) or iter_N directory")
    p.add_argument("--output", required=True, type=Path, help="new or empty directory")
    p.add_argument("--tp", type=int, default=None, help="--to megallm: tensor-parallel size to validate for (1)")
    p.add_argument("--pp", type=int, default=None, help="--to megallm: pipeline-parallel size to validate for (1)")
    p.add_argument("--vpp", type=int, default=None, help="--to megallm: virtual pipeline stages per rank")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="--to hf: dtype of the written weights (default fp32; megallm checkpoints are always fp32)")
    p.add_argument("--max-shard-size", default="5GB", help="--to hf: largest safetensors shard (default 5GB)")
    return p.parse_args(argv)


def usage_error(args) -> str | None:
    if args.source == "hf" and args.target == "hf":
        return "--from hf --to hf: nothing to convert"
    if args.target == "hf" and any(v is not None for v in (args.tp, args.pp, args.vpp)):
        return ("--tp/--pp/--vpp describe megallm layouts; HuggingFace checkpoints have none "
                "(leave them out with --to hf)")
    if args.target == "megallm" and args.dtype == "bf16":
        return "--dtype bf16: megallm checkpoints hold the trainer's fp32 master weights; --dtype applies to --to hf"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = usage_error(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    layout = {"tp": args.tp or 1, "pp": args.pp or 1, "vpp": args.vpp}
    try:
        if args.target == "hf":
            out = convert.megallm_to_hf(args.input, args.output, dtype=args.dtype or "fp32",
                                        max_shard_size=parse_size(args.max_shard_size), progress=tqdm)
        elif args.source == "hf":
            out = convert.hf_to_megallm(args.input, args.output, **layout, progress=tqdm)
        else:
            out = convert.reshard(args.input, args.output, **layout, progress=tqdm)
    except (ConversionError, CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    if args.target == "megallm":
        model = convert.config_from_meta(read_meta(out), str(out)).model
        print(f"train from it: launch/pretrain_llama2.py {convert.model_flags(model)} --tp {layout['tp']} "
              f"--pp {layout['pp']}" + (f" --vpp {layout['vpp']}" if layout["vpp"] else "") + f" --load {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
