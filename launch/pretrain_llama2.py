"""Pretrain LLaMA2 with tensor, pipeline and data parallelism.

    torchrun --nproc_per_node 8 launch/pretrain_llama2.py --config configs/llama2_70b.yaml --tp 8 --pp 8

Flags -> config -> validate (before any process group) -> check data -> init groups -> build -> train.
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


def check_before_start(cfg, world_size: int) -> int:
    """Config rules, inputs, hyperparameter lint, memory fit and data check; returns an exit code
    (0 = go). Everything up to the lint runs on every rank and gives every rank the same verdict."""

    errors = [f"config error: {e}" for e in config_mod.validate(cfg, world_size)]
    if not errors:
        errors = [f"input error: {e}" for e in check_inputs(cfg)]
    if errors:
        return refuse(errors)
    for w in config_mod.lint_hyperparameters(cfg):
        rank0_print(f"warning: {w}")
    import torch

    from megallm.planner import fit_warning

    if torch.cuda.is_available():
        warning = fit_warning(cfg, world_size, torch.cuda.get_device_properties(0).total_memory)
        if warning:
            rank0_print(f"warning: {warning}")
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_mod.add_config_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config_mod.config_from_args(args)
    except config_mod.ConfigError as e:
        return refuse([f"config error: {e}"])
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    code = check_before_start(cfg, world_size)
    if code:
        return code

    import torch
    import torch.distributed as dist

    from megallm import platform
    from megallm.parallel.topology import initialize_model_parallel
    from megallm.training import checkpoint
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
        checkpoint.install_signal_handlers(trainer)
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
