"""One training iteration, top to bottom, and the loop around it.

    batch -> pipeline forward/backward (fp32 main grads) -> reduce over data parallel
          -> global loss, global grad norm
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

from megallm import __version__, checkpoint, platform
from megallm.config import Config
from megallm.data import sampler
from megallm.model import weight_mapping
from megallm.parallel import data_parallel as dp_utils
from megallm.parallel import sequence_parallel
from megallm.parallel.distributed_optimizer import DistributedOptimizer
from megallm.parallel.pipeline import PipelineRunner, build_model_chunks
from megallm.training import fault_injection as faults
from megallm.training import forensics, resilience
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


StopTraining = resilience.StopTraining


@dataclass
class Trainer:
    cfg: Config
    world_size: int
    device: torch.device
    chunks: list[nn.Module]  # this rank's model chunks, unwrapped
    model: list[nn.Module]  # the same chunks (data parallelism lives in the optimizer's buffers)
    runner: PipelineRunner
    optimizer: DistributedOptimizer
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
    resume_data_state: Optional[dict] = None  # data state of the checkpoint loaded (datasets are built from it)
    # f(trainer, record) after each iteration; the loop itself keeps no history (bounded memory over any run)
    callbacks: list = field(default_factory=list)
    doc_losses: Optional[forensics.DocumentForensics] = None  # per-document losses (training/forensics.py)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, cfg: Config, world_size: int, datasets=None) -> Trainer:
        ps = _ps()
        device = platform.device()
        torch.manual_seed(cfg.training.seed)
        chunks = build_model_chunks(cfg, device)
        tp_rank = ps.get_tensor_model_parallel_rank()
        for chunk in chunks:
            weight_mapping.init_weights(chunk, cfg, tp_rank)
        model = chunks
        runner = PipelineRunner(model, cfg, cfg.num_micro_batches(world_size), loss_fn, device)
        runner.warmup()
        optimizer = build_optimizer(model, cfg, runner)  # moves the parameters into its flat buffers
        if datasets is None and not cfg.checkpoint.load:
            from megallm.data.dataset import build_datasets

            datasets = build_datasets(cfg)
        # With --load, the datasets wait for the checkpoint actually loaded (build_datasets below).
        train_ds, valid_ds = datasets[:2] if datasets is not None else (None, None)
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

    def build_datasets(self) -> None:
        """Datasets from the data state of the checkpoint loaded (collective; once)."""
        if self.train_ds is not None:
            return
        from megallm.data.dataset import build_datasets

        self.train_ds, self.valid_ds = build_datasets(self.cfg, resume_state=self.resume_data_state)[:2]

    def state_dict(self) -> dict:
        """The trainer's own progress (JSON), as the checkpoint stores it."""
        return {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
                "scheduler": self.scheduler.state_dict(), "detector": self.detector.state_dict(),
                "policy": self.policy.state_dict(), "data_state": self.data_state()}

    def load_state_dict(self, state: dict) -> None:
        """Progress from a checkpoint; a model-only one gives just its iteration."""
        self.iteration = state.get("iteration", 0)
        self.consumed_samples = state.get("consumed_samples", 0)
        if "scheduler" in state:
            # megatron's load_state_dict steps the scheduler by the saved count from wherever it
            # stands: from 0 on a resume, but a rollback finds it mid-run
            self.scheduler.num_steps = 0
            self.scheduler.load_state_dict(state["scheduler"])
            self.scheduler.step(increment=0)  # re-applies the restored learning rate to the param groups
        if "detector" in state:
            self.detector.load_state_dict(state["detector"])
        if "policy" in state:
            self.policy.load_state_dict(state["policy"])
        self.resume_data_state = state.get("data_state")

    def data_state(self) -> Optional[dict]:
        """Where each dataset of the blend stands, so a resume with another --data-path replays nothing."""
        if not self.cfg.data.data_path or self.train_ds is None:
            return self.resume_data_state
        from megallm.data.blend import data_state

        return data_state(self.train_ds, self.cfg.data.data_path, self.consumed_samples, self.exclude)

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
        self.optimizer.zero_grad()
        tokens, labels = self.local_batch(self.train_ds, self.consumed_samples)
        with forensics.keep_token_losses() as token_losses:
            losses = self.runner.step(tokens, labels)  # in the parameters' precision: no autocast
        self.optimizer.reduce_gradients(self.runner.microbatch_divisor)
        # Replicated norms saw 1/tp of the tokens: sum their main grads over tp. After the dp
        # reduction, which has folded in every p.grad; the buffers are laid out alike on every tp
        # rank, so a dp share holds the same elements on each of them.
        sequence_parallel.allreduce_sequence_parallel_grads(self.params)
        faults.maybe_poison_gradients(self.params, self.iteration + 1, self.consumed_samples,
                                      cfg.training.global_batch_size)

        # Every rank gets the same loss, grad norm and "some rank has a NaN/Inf gradient" flag (the
        # flag rides in the norm's and the loss's collectives), so every rank takes the same
        # decision from the same inputs and keeps the same detector state.
        norm, replica_nonfinite = self.optimizer.grad_norm()
        loss, any_nonfinite = dp_utils.global_loss(losses, self.device, replica_nonfinite)
        grad_norm = float(norm)
        spike_start = time.perf_counter()  # the detector's own cost: its statistics
        decision = self.detector.evaluate(loss, grad_norm, nonfinite_elsewhere=any_nonfinite)
        # warn lets finite spikes through; a NaN/Inf gradient would put NaN into every weight
        skip = decision.spike and (cfg.spike.spike_action != "warn" or decision.reason.startswith("nonfinite"))
        lr = current_lr(self.optimizer)
        spike_ms = (time.perf_counter() - spike_start) * 1000.0
        forensics_start = time.perf_counter()
        if self.doc_losses is not None:
            # The last n are the micro-batches': on its first step after an evaluation, torch's
            # schedule re-infers its stages' shapes (eval() switched them to forward-only), and the
            # last stage calls loss_fn once on that inference forward before any micro-batch.
            self.doc_losses.observe(self.iteration + 1, self.train_ds, self.local_samples(self.consumed_samples),
                                    token_losses[-self.runner.n_microbatches:])
        forensics_ms = (time.perf_counter() - forensics_start) * 1000.0

        if not skip:  # a skipped iteration leaves weights, masters and moments untouched
            self.optimizer.clip_(cfg.optimizer.clip_grad, grad_norm)
            self.optimizer.step()
            self.scheduler.step(increment=1)
        self.detector.observe(decision)  # learns unflagged values only (OLMo-core's rule: every one)

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
                "zscore_threshold": self.detector.zscore_threshold,
                "grad_zscore_threshold": self.detector.grad_zscore_threshold,
                "action": action, "samples": samples, "documents": _describe(self.train_ds, samples),
                "ranked_documents": ranked,
            })
        if action == "stop":
            raise StopTraining(f"loss spike at iteration {self.iteration} "
                               f"({decision.reason}, loss {decision.loss:.4f}, "
                               f"z {decision.loss_zscore}); samples {consumed_before}..{self.consumed_samples - 1} "
                               f"(spike_action=stop)")
        if action == "rollback":
            resilience.rollback(self)

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

    def train(self) -> None:
        """Iterate until train_iters, a stop signal, or a StopTraining."""
        cfg = self.cfg
        self.build_datasets()
        self.logger.run_info(run_info(self), cfg.to_dict())
        self.logger.event("start" if self.iteration == 0 else "resume", self.iteration,
                          consumed_samples=self.consumed_samples)
        try:
            self._train_loop()
            self.optimizer.finish_param_sync()  # whoever reads the weights next sees the last step's
        finally:
            checkpoint.wait_for_pending()  # a background write is committed (or reported) before we return
        self.logger.event("stop", self.iteration, consumed_samples=self.consumed_samples)

    def _train_loop(self) -> None:
        cfg = self.cfg
        while self.iteration < cfg.training.train_iters:
            record = self.train_step()
            t = cfg.training
            if t.eval_interval and self.iteration % t.eval_interval == 0 and self.valid_ds is not None:
                record["val_loss"] = self.evaluate()
            self.logger.iteration(record)
            if self.logger.enabled and (self.iteration % cfg.logging.log_interval == 0 or record["skipped"]):
                print(progress_line(record, t.train_iters), flush=True)
            for callback in self.callbacks:
                callback(self, record)
            stop = resilience.stop_vote(self)
            if cfg.checkpoint.save and (stop or checkpoint.due(cfg, self.iteration)):
                checkpoint.save(self)
            if stop:
                self.logger.event("signal", self.iteration, saved=bool(cfg.checkpoint.save))
                break


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
