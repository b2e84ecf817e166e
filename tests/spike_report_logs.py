"""A plausible run's log directory, written to the training loop's log contract
(docs/spike_report.md), for the spike report's tests.

The run's spike decisions are the training loop's own detector (megallm.training.spikes, the
config's method) on the simulated losses, so the logs are what a run would write, and it plants:
  40  junk document, loss spike -> skip; the loss stays 4 sigma high (unflagged) for 2 more steps
  60  NaN loss -> skip (nonfinite_loss)
  75  junk document again -> skip
  100 junk document a third time -> rollback to the checkpoint at 80; the data between the
      checkpoint and the spike is skipped on the replay
  130 grad-norm-only spike -> warn (applied)
and cuts the last metrics line in half, as a kill mid-write would.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import yaml

from megallm.config import Config
from megallm.training.spikes import SpikeDetector

GBS, SEQ = 16, 128
JUNK = {"sample_offset": 3, "dataset": "data/junk", "document": 7, "source": "junk.jsonl:7"}
PLAN = {40: ("loss", "skip"), 60: ("nan", "skip"), 75: ("loss", "skip"), 100: ("loss", "rollback"),
        130: ("grad", "warn")}
JUNK_ITERATIONS = (40, 75, 100)
ROLLBACK = {"at": 100, "to": 80}


def run_config(iters: int, **optimizer) -> Config:
    cfg = Config()
    cfg.training.global_batch_size, cfg.training.seq_length, cfg.training.train_iters = GBS, SEQ, iters
    cfg.training.eval_interval = 50
    cfg.optimizer.lr, cfg.optimizer.lr_warmup_iters = 3e-3, 10
    for k, v in optimizer.items():
        setattr(cfg.optimizer, k, v)
    cfg.spike.spike_window, cfg.spike.spike_min_history = 64, 16
    cfg.spike.spike_action = "rollback"
    cfg.checkpoint.save, cfg.checkpoint.save_interval = "ckpt", 20
    return cfg


def _documents(samples: list[int], junk: bool) -> list[dict]:
    out = []
    for k in samples:
        out.append({"sample": k, "dataset": "data/shard", "documents": [2 * k, 2 * k + 1],
                    "sources": [f"shard_{k // 100}.jsonl:{2 * (k % 100) + 1}",
                                f"shard_{k // 100}.jsonl:{2 * (k % 100) + 2}"]})
    if junk:
        out[JUNK["sample_offset"]] = {"sample": samples[JUNK["sample_offset"]], "dataset": JUNK["dataset"],
                                      "documents": [JUNK["document"]], "sources": [JUNK["source"]]}
    return out


def simulate(iters: int = 160, seed: int = 0) -> dict:
    """Records (metrics, spikes, events) in execution order, as the training loop would log them."""
    rng = random.Random(seed)
    cfg = run_config(iters)
    detector = SpikeDetector.from_config(cfg.spike)
    saved = {0: detector.state_dict()}  # the detector's state in each checkpoint
    metrics, spikes, events = [], [], [{"event": "start", "iteration": 0, "time": 0.0}]
    consumed, it, elevated, rolled_back = 0, 0, 0, False
    ckpt_consumed = {0: 0}
    while it < iters:
        it += 1
        noise = random.Random(seed * 100_003 + it)  # a replayed iteration draws the same noise
        base = 3.0 + 2.0 * math.exp(-it / 200) + noise.gauss(0, 0.02)
        grad = 1.0 + noise.gauss(0, 0.05)
        kind, action = PLAN.get(it, (None, None)) if not (rolled_back and it == ROLLBACK["at"]) else (None, None)
        loss = base
        if kind == "loss":
            loss, grad = base + 3.0, grad * 20
        elif kind == "nan":
            loss, grad = float("nan"), float("nan")
        elif kind == "grad":
            grad = grad * 30
        elif elevated:  # after the first spike the loss stays 4 sigma high for a while: slow recovery
            probe = detector.evaluate(base, grad)
            loss, elevated = probe.loss_mean + 4 * probe.loss_std, elevated - 1
        decision = detector.evaluate(loss, grad)
        reason, lz, gz = decision.reason, decision.loss_zscore, decision.grad_zscore
        assert (reason is None) == (kind is None), (it, kind, decision)
        skipped = action in ("skip", "rollback")
        samples = list(range(consumed, consumed + GBS))
        lr = 3e-3 * min(1.0, it / 10)
        record = {"iteration": it, "consumed_samples": consumed + GBS, "loss": loss, "lr": lr, "grad_norm": grad,
                  "skipped": skipped, "skip_reason": reason, "loss_zscore": lz,
                  "grad_zscore": gz, "tokens_per_sec": 5000.0 + rng.gauss(0, 50), "elapsed_ms": 400.0,
                  "global_batch_size": GBS, "seq_length": SEQ}
        if it % 50 == 0:
            record["val_loss"] = base + 0.1
        metrics.append(record)
        if reason:
            spikes.append({"iteration": it, "consumed_samples_start": consumed, "consumed_samples_end": consumed + GBS,
                           **decision.to_dict(), "lr": lr,
                           "zscore_threshold": detector.zscore_threshold,
                           "grad_zscore_threshold": detector.grad_zscore_threshold,
                           "reason": reason, "action": action, "samples": samples,
                           "documents": _documents(samples, it in JUNK_ITERATIONS)})
        consumed += GBS
        if it == 40:
            elevated = 2
        detector.observe(decision)
        if it % cfg.spike.spike_skip_window == 0 or it % cfg.checkpoint.save_interval == 0:
            saved[it] = detector.state_dict()
            ckpt_consumed[it] = consumed
            events.append({"event": "checkpoint", "iteration": it, "time": float(it)})
        if action == "rollback":
            to = ROLLBACK["to"]
            events.append({"event": "rollback", "iteration": it, "time": float(it), "to_iteration": to,
                           "checkpoint": f"ckpt/iter_{to:07d}", "spike_iterations": [it],
                           "consumed_samples_before": consumed, "consumed_samples_after": consumed})
            # The detector's window is restored with the model; the data resumes past the bad stretch.
            detector.load_state_dict(saved[to])
            it, rolled_back = to, True
    return {"config": cfg, "metrics": metrics, "spikes": spikes, "events": events}


def write_run(log_dir: Path, iters: int = 160, truncate: bool = True, spikes_file: bool = True) -> dict:
    """The JSON logs of a simulated run; returns the simulation for the test's expectations."""
    run = simulate(iters)
    log_dir.mkdir(parents=True, exist_ok=True)
    cfg = run["config"]
    (log_dir / "run.json").write_text(json.dumps({
        "megallm_version": "0.1.0", "world_size": 2, "layout": {"tp": 1, "pp": 1, "vpp": None, "dp": 2},
        "config": cfg.to_dict(), "started": "2025-01-01T00:00:00", "exclude_samples": None,
        "num_excluded_samples": 0}))
    (log_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    lines = [json.dumps(m) for m in run["metrics"]]  # allow_nan: NaN literals, as the loop writes
    text = "\n".join(lines) + "\n"
    if truncate:  # a kill mid-write: half of the last line, no newline
        text = "\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2]
    (log_dir / "metrics.jsonl").write_text(text)
    if spikes_file:
        (log_dir / "spikes.jsonl").write_text("".join(json.dumps(s) + "\n" for s in run["spikes"]))
    (log_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in run["events"]))
    return run


def write_tensorboard_only(log_dir: Path, iters: int = 160) -> dict:
    """The same run with only tensorboard/ event files, in the exact format torch's SummaryWriter
    writes (tensorboard's EventFileWriter, simple_value scalars), without importing torch."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    run = simulate(iters)
    writer = EventFileWriter(str(log_dir / "tensorboard"))
    t0 = time.time()
    tags = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "skipped": "train/skipped",
            "loss_zscore": "train/loss_zscore", "grad_zscore": "train/grad_zscore",
            "tokens_per_sec": "train/tokens_per_sec", "val_loss": "val/loss"}
    for n, m in enumerate(run["metrics"]):
        for key, tag in tags.items():
            value = m.get(key)
            if value is None:
                continue
            summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(value))])
            writer.add_event(event_pb2.Event(wall_time=t0 + n, step=m["iteration"], summary=summary))
    writer.close()
    return run
