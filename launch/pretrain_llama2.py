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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megallm import config as config_mod  # noqa: E402

# Megatron's linears warn without it; one connection also keeps NCCL's TP all-reduce ordered behind
# the GEMMs it overlaps with on GPU.
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")


def rank0_print(*args) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, flush=True)


def check_before_start(cfg, world_size: int) -> int:
    """Config rules, hyperparameter lint, memory fit and data check; returns an exit code (0 = go)."""
    errors = config_mod.validate(cfg, world_size)
    for e in errors:
        rank0_print(f"config error: {e}")
    if errors:
        return 2
    for w in config_mod.lint_hyperparameters(cfg):
        rank0_print(f"warning: {w}")
    import torch

    from megallm.planner import fit_warning

    if torch.cuda.is_available():
        warning = fit_warning(cfg, world_size, torch.cuda.get_device_properties(0).total_memory)
        if warning:
            rank0_print(f"warning: {warning}")
    if cfg.data.data_path and not cfg.data.skip_data_check and int(os.environ.get("RANK", 0)) == 0:
        from megallm.data.check import check_data

        prefixes = [p for p in cfg.data.data_path if not _is_number(p)]
        findings = check_data(prefixes, cfg.model.vocab_size, tokenizer_model=cfg.data.tokenizer_model)
        for f in findings:
            print(f"data error: {f}", flush=True)
        if findings:
            print("refusing to start: fix the data above (or pass --skip-data-check)", flush=True)
            return 2
    return 0


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cfg, _ = config_mod.parse_config(argv, parser)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    code = check_before_start(cfg, world_size)
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
            rank0_print(f"checkpoint error: {e}")
            return 2
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
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
