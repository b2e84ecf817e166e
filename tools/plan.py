"""Will a layout fit, and how fast will it go? Memory per GPU, bubble, FLOPs, communication, MFU.

    python tools/plan.py --config configs/llama2_70b.yaml --nodes 8 --gpus-per-node 8 --gpu h100-80gb
    python tools/plan.py --config configs/llama2_70b.yaml --nodes 8 --gpus-per-node 8 --search
    python tools/plan.py --config configs/tiny.yaml --gpus-per-node 2 --gpu cpu --recompute none --json

Any config field can be overridden as a flag (--tp 4 --pp 8 --micro-batch-size 1 ...).
Exit status: 0 fits (or --search found layouts), 1 does not fit (none found), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys

from megallm.config import parse_config
from megallm.planner import DEVICES, RECOMPUTE, PlanError, plan, search
from megallm.planner.report import render_plan, render_search


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu", choices=list(DEVICES), default="h100-80gb", help="device kind (default h100-80gb)")
    parser.add_argument("--recompute", choices=RECOMPUTE, default=None,
                        help="plan this recompute instead of the config's (--recompute-granularity etc.)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                        help="model-state/activation bytes (default: params_dtype; auto = bf16 on GPUs, fp32 on cpu)")
    parser.add_argument("--attention", choices=["flash", "math"], default="flash",
                        help="math: attention scores are stored (no flash kernel)")
    parser.add_argument("--search", action="store_true", help="list the layouts that fit, fastest first")
    parser.add_argument("--top", type=int, default=15, help="with --search: how many to print")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    cfg, args = parse_config(argv, parser)
    if args.nodes < 1 or args.gpus_per_node < 1:
        print("plan error: --nodes and --gpus-per-node must be at least 1", file=sys.stderr)
        return 2
    # sequence parallelism and recompute are the config's (--sequence-parallel, --recompute-*): what the engine runs
    options = dict(precision=args.precision, flash_attention=args.attention == "flash")
    try:
        if args.search:
            plans = search(cfg, args.nodes, args.gpus_per_node, args.gpu, **options)
            print(json.dumps([p.to_dict() for p in plans[:args.top]], indent=1) if args.json
                  else render_search(plans, args.top))
            return 0 if plans else 1
        p = plan(cfg, args.nodes * args.gpus_per_node, args.gpu, args.recompute,
                 gpus_per_node=args.gpus_per_node, **options)
    except PlanError as e:
        print(f"plan error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(p.to_dict(), indent=1) if args.json else render_plan(p))
    return 0 if p.fits else 1


if __name__ == "__main__":
    sys.exit(main())
