"""One training iteration, top to bottom, and the loop around it.

    batch -> pipeline forward/backward (DDP all-reduces gradients) -> global loss, global grad norm
          -> spike decision (identical on every rank) -> clip + AdamW step + LR step, or skip
          -> metrics; checkpoint; maybe rollback

Process groups must exist before `Trainer.build` (see launch/pretrain_llama2.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import nn

from megallm import __version__, platform
from megallm.config import Config
from megallm.data import sampler
from megallm.model import weight_mapping
from megallm.parallel import data_parallel as dp_utils
from megallm.parallel.pipeline import PipelineRunner, build_model_chunks
from megallm.training import faults, forensics
from megallm.training.metrics import MetricsLogger, progress_line
from megallm.training.optimizer import build_optimizer, build_scheduler, current_lr
from megallm.training.spikes import RollbackPolicy, SpikeDecision, SpikeDetector


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy over vocab-parallel logits (no label smoothing: megatron's TP>1
    smoothing is wrong upstream)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    per_token = vocab_parallel_cross_entropy(logits.float(), labels)
    forensics.keep(per_token)  # for per-document losses, when a train step collects them
    return per_token.mean()


def _ps():
    from megatron.core import parallel_state

    return parallel_state


class StopTraining(Exception):
    """The run cannot go on (spike_action=stop, or rollbacks exhausted); the message says why."""


@dataclass
class Trainer:
    cfg: Config
    world_size: int
    device: torch.device
    chunks: list[nn.Module]  # this rank's model chunks, unwrapped
    model: list[nn.Module]  # the same, wrapped in DDP
    runner: PipelineRunner
    optimizer: torch.optim.Optimizer
    scheduler: object
    detector: SpikeDetector
    policy: RollbackPolicy
    train_ds: object
    valid_ds: object
    logger: MetricsLogger
    exclude: Optional[np.ndarray] = None
    iteration: int = 0
    consumed_samples: int = 0
    stop_requested: bool = False
    records: list = field(default_factory=list)  # metrics of this process's iterations (tests read them)
    callbacks: list = field(default_factory=list)  # f(trainer, record) after each iteration
    doc_losses: Optional[forensics.DocumentForensics] = None  # per-document losses (training/forensics.py)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, cfg: Config, world_size: int, datasets=None) -> "Trainer":
        ps = _ps()
        device = platform.device()
        torch.manual_seed(cfg.training.seed)
        chunks = build_model_chunks(cfg, device)
        tp_rank = ps.get_tensor_model_parallel_rank()
        for chunk in chunks:
            weight_mapping.init_weights(chunk, cfg, tp_rank)
        interleaved = cfg.parallel.virtual_pipeline_model_parallel_size is not None
        model = dp_utils.wrap_data_parallel(chunks, interleaved)
        runner = PipelineRunner(model, cfg, cfg.num_micro_batches(world_size), loss_fn, device)
        runner.warmup()
        optimizer = build_optimizer(model, cfg)
        if datasets is None:
            from megallm.data.dataset import build_datasets
            from megallm.training.checkpoint import resume_data_state

            datasets = build_datasets(cfg, resume_state=resume_data_state(cfg.checkpoint.load)
                                      if cfg.checkpoint.load else None)
        train_ds, valid_ds = datasets[0], datasets[1]
        exclude = None
        if cfg.data.exclude_samples:
            exclude = np.array(sorted(sampler.load_exclude_samples(cfg.data.exclude_samples)), dtype=np.int64)
        logger = MetricsLogger(cfg.logging.log_dir, enabled=torch.distributed.get_rank() == 0,
                               tensorboard=cfg.logging.tensorboard)
        return cls(cfg=cfg, world_size=world_size, device=device, chunks=chunks, model=model, runner=runner,
                   optimizer=optimizer, scheduler=build_scheduler(optimizer, cfg),
                   detector=SpikeDetector.from_config(cfg.spike), policy=RollbackPolicy.from_config(cfg.spike),
                   train_ds=train_ds, valid_ds=valid_ds, logger=logger, exclude=exclude,
                   doc_losses=forensics.DocumentForensics.from_config(cfg, ps.get_data_parallel_rank(), enabled=(
                       ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0)))

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for c in self.chunks for p in c.parameters()]

    # ------------------------------------------------------------------------------------------
    def local_batch(self, dataset, consumed_samples: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """This data-parallel rank's micro-batches of the global batch starting at consumed_samples,
        stacked [n_micro * micro_batch_size, seq]. Only the first and last pipeline stages read data."""
        ps, t = _ps(), self.cfg.training
        first = ps.get_pipeline_model_parallel_rank() == 0
        last = ps.get_pipeline_model_parallel_rank() == ps.get_pipeline_model_parallel_world_size() - 1
        if not (first or last):
            return None, None
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        tokens, labels = [], []
        for m in range(self.runner.n_microbatches):
            idx = sampler.micro_batch_indices(consumed_samples, t.micro_batch_size, dp_rank, dp_size, m,
                                              exclude=self.exclude)
            x, y = sampler.get_micro_batch(dataset, idx)
            if dataset is self.train_ds:
                x, y = faults.maybe_plant_junk(x, y, idx, self.cfg.model.vocab_size)
            tokens.append(x)
            labels.append(y)
        return torch.cat(tokens).to(self.device), torch.cat(labels).to(self.device)

    def local_samples(self, consumed_samples: int) -> list[int]:
        """Dataset indices of this data-parallel rank's rows of the batch, in local_batch's order."""
        ps, t = _ps(), self.cfg.training
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        return [int(i) for m in range(self.runner.n_microbatches)
                for i in sampler.micro_batch_indices(consumed_samples, t.micro_batch_size, dp_rank, dp_size, m,
                                                     exclude=self.exclude)]

    def global_batch_samples(self, consumed_samples: int) -> list[int]:
        return [int(i) for i in sampler.global_batch_indices(consumed_samples, self.cfg.training.global_batch_size,
                                                              exclude=self.exclude)]

    # ------------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One iteration: forward/backward of the global batch, then update or skip on every rank alike."""
        cfg, start = self.cfg, time.perf_counter()
        faults.maybe_hang(self.iteration + 1)
        for p in self.params:
            p.grad = None
        tokens, labels = self.local_batch(self.train_ds, self.consumed_samples)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"), \
                forensics.keep_token_losses() as token_losses:
            losses = self.runner.step(tokens, labels)
        faults.maybe_poison_gradients(self.params, self.iteration + 1, self.consumed_samples,
                                      cfg.training.global_batch_size)

        # Every rank gets the same loss, grad norm and "some rank has a NaN/Inf gradient" flag (the
        # flag rides in the norm's and the loss's collectives), so every rank takes the same
        # decision from the same inputs and keeps the same detector state.
        norm, replica_nonfinite = dp_utils.global_grad_norm(self.params)
        loss, any_nonfinite = dp_utils.global_loss(losses, self.device, replica_nonfinite)
        grad_norm = float(norm)
        spike_start = time.perf_counter()  # the detector's own cost: its statistics
        decision = self.detector.evaluate(loss, grad_norm, nonfinite_elsewhere=any_nonfinite)
        skip = decision.spike and cfg.spike.spike_action != "warn"
        lr = current_lr(self.optimizer)
        spike_ms = (time.perf_counter() - spike_start) * 1000.0
        forensics_start = time.perf_counter()
        if self.doc_losses is not None:
            self.doc_losses.observe(self.iteration + 1, self.train_ds, self.local_samples(self.consumed_samples),
                                    token_losses)
        forensics_ms = (time.perf_counter() - forensics_start) * 1000.0

        if skip:
            for p in self.params:
                p.grad = None
        else:
            dp_utils.clip_grads_(self.params, cfg.optimizer.clip_grad, torch.tensor(grad_norm))
            self.optimizer.step()
            self.scheduler.step(increment=1)
            if not decision.spike:
                self.detector.accept(loss, grad_norm)

        consumed_before = self.consumed_samples
        self.iteration += 1
        self.consumed_samples += cfg.training.global_batch_size
        elapsed = time.perf_counter() - start
        record = {
            "iteration": self.iteration, "consumed_samples": self.consumed_samples, "loss": loss, "lr": lr,
            "grad_norm": grad_norm, "skipped": skip, "skip_reason": decision.reason if decision.spike else None,
            "loss_zscore": decision.loss_zscore, "grad_zscore": decision.grad_zscore,
            "tokens_per_sec": cfg.training.global_batch_size * cfg.training.seq_length / elapsed,
            "elapsed_ms": elapsed * 1000.0, "spike_check_ms": spike_ms, "forensics_ms": forensics_ms,
            "global_batch_size": cfg.training.global_batch_size,
            "seq_length": cfg.training.seq_length,
        }
        if decision.spike:
            self.on_spike(decision, consumed_before, lr)
        return record

    def on_spike(self, decision: SpikeDecision, consumed_before: int, lr: float) -> None:
        cfg = self.cfg
        self.policy.record_spike(self.iteration)
        action = cfg.spike.spike_action
        persistent = self.policy.wants_rollback(self.iteration)
        if action == "rollback" and not persistent:
            action = "skip"
        elif action == "skip" and persistent:
            # Skipping cannot leave a bad parameter state; see SpikeDetector.rebaseline.
            spikes = self.policy.recent_spikes(self.iteration)
            self.detector.rebaseline()
            self.policy.forget(spikes)
            self.logger.event("persistent_spikes", self.iteration, spike_iterations=spikes,
                              advice="skips persist: the parameters, not one batch, are the problem; the "
                                     "detector re-baselined. --spike-action rollback would reload a checkpoint")
            if self.logger.enabled:
                print(f" warning: {len(spikes)} spikes within {cfg.spike.spike_skip_window} iterations "
                      f"({spikes}); re-baselining the spike detector", flush=True)
        ranked = forensics.spike_documents(self.doc_losses)  # every rank: a gather, on spikes only
        if self.logger.enabled:
            samples = self.global_batch_samples(consumed_before)
            self.logger.spike({
                "iteration": self.iteration, "consumed_samples_start": consumed_before,
                "consumed_samples_end": self.consumed_samples, "lr": lr, **decision.to_dict(),
                "zscore_threshold": cfg.spike.spike_zscore, "grad_zscore_threshold": cfg.spike.spike_grad_zscore,
                "action": action, "samples": samples, "documents": _describe(self.train_ds, samples),
                "ranked_documents": ranked,
            })
        if action == "stop":
            raise StopTraining(f"loss spike at iteration {self.iteration} ({decision.reason}, loss {decision.loss:.4f}, "
                               f"z {decision.loss_zscore}); samples {consumed_before}..{self.consumed_samples - 1} "
                               f"(spike_action=stop)")
        if action == "rollback":
            from megallm.training import checkpoint

            checkpoint.rollback(self)

    # ------------------------------------------------------------------------------------------
    def evaluate(self) -> float:
        """Mean loss over eval_iters global batches of the validation split, on every rank."""
        cfg = self.cfg
        for m in self.model:
            m.eval()
        losses = []
        for i in range(cfg.training.eval_iters):
            offset = ((self.iteration // max(cfg.training.eval_interval, 1)) * cfg.training.eval_iters + i)
            tokens, labels = self.local_batch(self.valid_ds, offset * cfg.training.global_batch_size)
            local = self.runner.evaluate(tokens, labels)
            losses.append(dp_utils.global_loss(local, self.device)[0])
        for m in self.model:
            m.train()
        return float(np.mean(losses))

    def train(self) -> list[dict]:
        """Iterate until train_iters, a stop signal, or a StopTraining."""
        from megallm.training import checkpoint

        cfg = self.cfg
        self.logger.run_info(run_info(self), cfg.to_dict())
        self.logger.event("start" if self.iteration == 0 else "resume", self.iteration,
                          consumed_samples=self.consumed_samples)
        while self.iteration < cfg.training.train_iters:
            record = self.train_step()
            t = cfg.training
            if t.eval_interval and self.iteration % t.eval_interval == 0 and self.valid_ds is not None:
                record["val_loss"] = self.evaluate()
            self.records.append(record)
            self.logger.iteration(record)
            if self.logger.enabled and (self.iteration % cfg.logging.log_interval == 0 or record["skipped"]):
                print(progress_line(record, t.train_iters), flush=True)
            for callback in self.callbacks:
                callback(self, record)
            saved = checkpoint.maybe_save(self)
            if self.stop_requested:
                if not saved and cfg.checkpoint.save:
                    checkpoint.save(self)
                self.logger.event("signal", self.iteration, saved=bool(cfg.checkpoint.save))
                break
        self.logger.event("stop", self.iteration, consumed_samples=self.consumed_samples)
        return self.records


def run_info(tr: Trainer) -> dict:
    ps = _ps()
    from datetime import datetime, timezone

    return {
        "megallm_version": __version__, "world_size": tr.world_size,
        "layout": {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
                   "vpp": tr.cfg.parallel.virtual_pipeline_model_parallel_size,
                   "dp": ps.get_data_parallel_world_size()},
        "started": datetime.now(timezone.utc).isoformat(), "exclude_samples": tr.cfg.data.exclude_samples,
        "num_excluded_samples": 0 if tr.exclude is None else int(len(tr.exclude)),
        "platform": platform.extras(),
    }


def _describe(dataset, samples: list[int]):
    from megallm.data.provenance import describe_samples

    try:
        return describe_samples(dataset, samples)
    except (AttributeError, TypeError, NotImplementedError):
        return None  # e.g. synthetic data has no documents
