"""What the logging rank writes: metrics.jsonl, spikes.jsonl, events.jsonl, TensorBoard, stdout.

Every line is flushed as written, so a run killed at any point leaves complete lines (at most
the last one truncated), which the spike-report tool reads.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

TENSORBOARD_SCALARS = {
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "skipped": "train/skipped",
    "loss_zscore": "train/loss_zscore", "grad_zscore": "train/grad_zscore", "tokens_per_sec": "train/tokens_per_sec",
    "val_loss": "val/loss",
}


class MetricsLogger:
    """Writes on the logging rank only; every other rank gets a logger whose methods do nothing."""

    def __init__(self, log_dir: str | Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.log_dir = Path(log_dir)
        self.tb = None
        if not enabled:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._files = {name: open(self.log_dir / f"{name}.jsonl", "a") for name in ("metrics", "spikes", "events")}
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.log_dir / "tensorboard"))

    def _write(self, name: str, record: dict) -> None:
        if self.enabled:
            f = self._files[name]
            f.write(json.dumps(record) + "\n")
            f.flush()

    def run_info(self, info: dict, config: dict) -> None:
        if self.enabled:
            (self.log_dir / "run.json").write_text(json.dumps(info | {"config": config}, indent=1))
            (self.log_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    def iteration(self, record: dict) -> None:
        self._write("metrics", record)
        if self.tb is not None:
            for key, tag in TENSORBOARD_SCALARS.items():
                value = record.get(key)
                if value is not None:
                    self.tb.add_scalar(tag, float(value), record["iteration"])

    def spike(self, record: dict) -> None:
        self._write("spikes", record)

    def event(self, event: str, iteration: int, **fields) -> None:
        self._write("events", {"event": event, "iteration": iteration, "time": time.time(), **fields})

    def close(self) -> None:
        if self.enabled:
            for f in self._files.values():
                f.close()
            if self.tb is not None:
                self.tb.close()


def progress_line(r: dict, train_iters: int) -> str:
    """Megatron-like one-liner."""
    skipped = f" | skipped ({r['skip_reason']})" if r["skipped"] else ""
    val = f" | val loss: {r['val_loss']:.4f}" if r.get("val_loss") is not None else ""
    return (f" iteration {r['iteration']:>8d}/{train_iters:>8d} | consumed samples: {r['consumed_samples']:>10d} | "
            f"elapsed time per iteration (ms): {r['elapsed_ms']:.1f} | learning rate: {r['lr']:.3E} | "
            f"lm loss: {r['loss']:.6E} | grad norm: {r['grad_norm']:.3f} | tokens/s: {r['tokens_per_sec']:.0f}"
            f"{skipped}{val}")
