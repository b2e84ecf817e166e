"""Pretrain LLaMA2 with tensor, pipeline and data parallelism.

    torchrun --nproc_per_node 8 launch/pretrain_llama2.py --config configs/llama2_70b.yaml --tp 8 --pp 8

Flags -> config -> validate (before any process group) -> memory plan on the detected GPU (exit 2 if
it does not fit; --gpu to name the device, --no-memory-check to start anyway) -> check data -> init
groups -> build -> train.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path

from megallm import config as config_mod
from megallm.inputs import check_inputs, refuse

# Megatron's linears warn without it; one connection also keeps NCCL's TP all-reduce ordered behind
# the GEMMs it overlaps with on GPU.
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")


def rank0_print(*args) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, flush=True)


def detected_gpu() -> tuple[str, int] | None:
    """(name, total memory in bytes) of this rank's GPU as the driver reports it; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return props.name, props.total_memory


def check_memory(cfg, world_size: int, gpu: str | None = None,
                 device_description: tuple[str, int] | None = None) -> int:
    """Plan the run about to start (its real flags) on the device it will run on (`gpu`, else the
    one detected) and refuse it, exit 2 with the planner's table and the flags that would fit,
    when the busiest stage needs more than the device holds. No GPU and no --gpu: nothing to check."""
    from megallm.planner import PlanError, detect_device, flags_that_fit, plan
    from megallm.planner.report import render_plan

    if gpu is None:
        description = device_description or detected_gpu()
        if description is None:
            return 0
        gpu = detect_device(*description)
        if gpu is None:
            rank0_print(f"warning: no memory plan for GPU {description[0]!r}; pass --gpu (h100-80gb, h200-141gb, "
                        f"a100-80gb, ...) to check the layout against one the planner knows")
            return 0
    try:
        p = plan(cfg, world_size, gpu)
    except PlanError as e:
        return refuse([f"config error: {e}"])
    if p.fits:
        if p.verdict == "tight":
            rank0_print(f"warning: the busiest stage needs {p.total_bytes / 2**30:.1f} GiB of {gpu}'s "
                        f"{p.device_memory_bytes / 2**30:.1f} GiB (under 5% to spare)")
        return 0
    lines = [f"memory error: this layout does not fit {gpu}; the planner's figures for it:", render_plan(p), ""]
    remedies = flags_that_fit(cfg, world_size, gpu)
    if remedies:
        lines.append("flags that would fit:")
        lines += [f"  {flags:<90} {r.total_bytes / 2**30:6.1f} GiB per device" for flags, r in remedies]
    else:
        lines.append("no single memory flag fits: see `python tools/plan.py --search` for other layouts")
    lines.append("refusing to start (--no-memory-check starts anyway)")
    return refuse(lines)


def check_before_start(cfg, world_size: int, gpu: str | None = None, memory_check: bool = True,
                       device_description: tuple[str, int] | None = None) -> int:
    """Config rules, inputs, hyperparameter lint, memory fit and data check; returns an exit code
    (0 = go). Everything up to the lint runs on every rank and gives every rank the same verdict.
    device_description: (name, total memory) instead of asking torch (tests fake a GPU with it)."""

    errors = [f"config error: {e}" for e in config_mod.validate(cfg, world_size)]
    if not errors:
        errors = [f"input error: {e}" for e in check_inputs(cfg)]
    if errors:
        return refuse(errors)
    for w in config_mod.lint_hyperparameters(cfg):
        rank0_print(f"warning: {w}")
    if memory_check:
        code = check_memory(cfg, world_size, gpu, device_description)
        if code:
            return code
    if cfg.data.data_path and not cfg.data.skip_data_check and int(os.environ.get("RANK", 0)) == 0:
        # Reads every token: rank 0 only. The others block in init_process_group until rank 0
        # either joins or exits, and torchrun then ends them.
        from megallm.data.check import check_data

        findings = check_data(cfg.data.data_path, cfg.model.vocab_size, tokenizer_model=cfg.data.tokenizer_model)
        if findings:
            lines = [f"data error: {f}" for f in findings]
            print("\n".join(lines + ["refusing to start: fix the data above (or pass --skip-data-check)"]),
                  file=sys.stderr, flush=True)
            return 2
    return 0


def main(argv=None) -> int:
    from megallm.planner import DEVICES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", choices=[d for d in DEVICES if d != "cpu"], default=None,
                        help="plan memory for this device instead of the detected one")
    parser.add_argument("--no-memory-check", dest="memory_check", action="store_false",
                        help="start even when the planner says the layout does not fit")
    config_mod.add_config_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config_mod.config_from_args(args)
    except config_mod.ConfigError as e:
        return refuse([f"config error: {e}"])
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    code = check_before_start(cfg, world_size, args.gpu, args.memory_check)
    if code:
        return code

    import torch
    import torch.distributed as dist

    from megallm import checkpoint, platform
    from megallm.parallel.topology import initialize_model_parallel
    from megallm.training import resilience
    from megallm.training.loop import StopTraining, Trainer

    if "RANK" not in os.environ:  # plain `python launch/...`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))
    if torch.cuda.is_available():
        torch.cuda.set_device(platform.device())
    dist.init_process_group(platform.backend(cfg.parallel.distributed_backend),
                            timeout=timedelta(minutes=cfg.parallel.distributed_timeout_minutes))
    p = cfg.parallel
    initialize_model_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                              p.virtual_pipeline_model_parallel_size, p.distributed_timeout_minutes)
    trainer = Trainer.build(cfg, world_size)
    if cfg.checkpoint.load:
        try:
            loaded = checkpoint.load(trainer, cfg.checkpoint.load)
        except checkpoint.CheckpointError as e:
            return refuse([f"checkpoint error: {e}"])
        rank0_print(f" resumed from {cfg.checkpoint.load} at iteration {loaded}" if loaded is not None
                    else f" no checkpoint in {cfg.checkpoint.load}: starting from scratch")
    if cfg.training.exit_signal_handler:
        resilience.install_signal_handlers(trainer)
    from megallm.training import fault_tolerance

    fault_tolerance.attach(trainer)
    code = 0
    try:
        trainer.train()
    except StopTraining as e:
        rank0_print(f"stopping: {e}")
        code = 3
    finally:
        trainer.logger.close()
    rank0_print(f" logs: {Path(cfg.logging.log_dir).resolve()}")
    # Without the barrier a rank that finishes first tears down its gloo pairs while a peer's
    # worker threads still use them, and the peer dies at exit with SIGABRT (seen in CI).
    dist.barrier()
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
