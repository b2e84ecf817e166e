"""Print a resolved config, its parameter count and, with --stage, one pipeline stage built on the
meta device; exit 2 with every broken rule when the config (or the layout for --world-size) is invalid.

    python -m megallm.describe --config configs/llama2_70b.yaml
    python -m megallm.describe --config configs/llama2_70b.yaml --world-size 64 --stage 3

Kept out of megallm.config so that the config does not import the model and pipeline code.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import yaml

from megallm.config import Config, lint_hyperparameters, parameter_count, parse_config, validate


def describe(cfg: Config, world_size: Optional[int] = None) -> str:
    lines = [yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(), ""]
    n = parameter_count(cfg.model)
    lines.append(f"parameters: {n:,}")
    if cfg.padded_vocab_size != cfg.model.vocab_size:
        lines.append(f"parameters with vocab padded to {cfg.padded_vocab_size} for "
                     f"tp={cfg.parallel.tensor_model_parallel_size}: "
                     f"{parameter_count(cfg.model, cfg.padded_vocab_size):,}")
    if world_size is not None:
        lines.append(f"data_parallel_size: {cfg.data_parallel_size(world_size)} (world size {world_size})")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Print a resolved megallm config and its parameter count.")
    parser.add_argument("--describe", action="store_true", help="accepted for compatibility; describing is the default")
    parser.add_argument("--world-size", type=int, default=None, help="also validate for this many ranks")
    parser.add_argument("--stage", type=int, default=None, metavar="PP_RANK",
                        help="also build this pipeline rank's chunks on the meta device (no memory) and count "
                             "the parameters one of its tensor-parallel ranks holds")
    cfg, args = parse_config(argv, parser)
    if args.world_size is not None and args.world_size < 1:
        print("config error: --world-size must be at least 1", file=sys.stderr)
        return 2
    errors = validate(cfg, args.world_size)
    pp = cfg.parallel.pipeline_model_parallel_size
    if args.stage is not None and not 0 <= args.stage < pp:
        errors.append(f"--stage {args.stage}: must be a pipeline rank in 0..{pp - 1}")
    if errors:
        print("\n".join(f"config error: {e}" for e in errors), file=sys.stderr)
        return 2
    print(describe(cfg, args.world_size))
    if args.stage is not None:
        from megallm.parallel.pipeline import build_stage_on_meta

        chunks = build_stage_on_meta(cfg, args.stage)
        layers = [n for c in chunks for n in c.layer_numbers]
        count = sum(p.numel() for c in chunks for p in c.parameters())
        print(f"pipeline rank {args.stage}: layers {layers[0]}..{layers[-1]}, {count:,} parameters per "
              f"tensor-parallel rank (tp={cfg.parallel.tensor_model_parallel_size}), built on the meta device")
    for w in lint_hyperparameters(cfg):
        print(f"warning: {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
