"""Loss-spike detection: rolling z-scores of the loss and the gradient norm, and the rollback rule.

A spike is flagged when, with at least `min_history` accepted iterations in the window,

    (loss - mean(losses)) / std(losses)          > zscore        or
    (grad_norm - mean(norms)) / std(norms)       > grad_zscore,

and always when the loss or the gradient is NaN/Inf. Only upward deviations count: a loss that
falls fast is progress. Flagged values never enter the window, so a burst of spikes cannot
teach the detector that spikes are normal.

Inputs must be the globally reduced values (identical on all ranks), the "NaN/Inf elsewhere" flag
included (OR-reduced over all ranks by the caller), so that a rank-local NaN skips everywhere.
The spike-report tool reads the same statistics from spikes.jsonl, which this module's
SpikeDecision fills.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Optional


class RollingStats:
    """Mean and sample standard deviation of the last `window` accepted values."""

    def __init__(self, window: int):
        self.values: deque[float] = deque(maxlen=window)

    def __len__(self) -> int:
        return len(self.values)

    def add(self, x: float) -> None:
        self.values.append(float(x))

    @property
    def mean(self) -> float:
        return math.fsum(self.values) / len(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        n = len(self.values)
        if n < 2:
            return math.nan
        mean = self.mean
        return math.sqrt(math.fsum((v - mean) ** 2 for v in self.values) / (n - 1))

    def zscore(self, x: float) -> float:
        std = self.std
        if math.isnan(std):
            return math.nan
        if std == 0.0:
            return 0.0 if x == self.mean else math.copysign(math.inf, x - self.mean)
        return (x - self.mean) / std


@dataclass
class SpikeDecision:
    spike: bool
    reason: Optional[str]  # loss_zscore | grad_zscore | nonfinite_loss | nonfinite_grad
    loss: float
    grad_norm: float
    loss_zscore: Optional[float]
    grad_zscore: Optional[float]
    loss_mean: Optional[float]
    loss_std: Optional[float]
    grad_norm_mean: Optional[float]
    grad_norm_std: Optional[float]

    def to_dict(self) -> dict:
        return asdict(self)


def _finite_or_none(x: float) -> Optional[float]:
    return None if x is None or math.isnan(x) else x


class SpikeDetector:
    def __init__(self, window: int = 128, min_history: int = 32, zscore: float = 6.0, grad_zscore: float = 6.0):
        self.window, self.min_history = window, min_history
        self.zscore_threshold, self.grad_zscore_threshold = zscore, grad_zscore
        self.loss = RollingStats(window)
        self.grad_norm = RollingStats(window)

    @classmethod
    def from_config(cls, spike_cfg) -> "SpikeDetector":
        return cls(spike_cfg.spike_window, spike_cfg.spike_min_history, spike_cfg.spike_zscore,
                   spike_cfg.spike_grad_zscore)

    @property
    def active(self) -> bool:
        return len(self.loss) >= self.min_history

    def evaluate(self, loss: float, grad_norm: float, nonfinite_elsewhere: bool = False) -> SpikeDecision:
        """Decide without changing state; `accept` afterwards if the iteration was taken."""
        lz = self.loss.zscore(loss) if self.active and math.isfinite(loss) else math.nan
        gz = self.grad_norm.zscore(grad_norm) if self.active and math.isfinite(grad_norm) else math.nan
        if not math.isfinite(loss):
            reason = "nonfinite_loss"
        elif not math.isfinite(grad_norm) or nonfinite_elsewhere:
            reason = "nonfinite_grad"
        elif self.active and lz > self.zscore_threshold:
            reason = "loss_zscore"
        elif self.active and gz > self.grad_zscore_threshold:
            reason = "grad_zscore"
        else:
            reason = None
        return SpikeDecision(
            spike=reason is not None, reason=reason, loss=loss, grad_norm=grad_norm,
            loss_zscore=_finite_or_none(lz) if not math.isinf(lz) else lz,
            grad_zscore=_finite_or_none(gz) if not math.isinf(gz) else gz,
            loss_mean=_finite_or_none(self.loss.mean), loss_std=_finite_or_none(self.loss.std),
            grad_norm_mean=_finite_or_none(self.grad_norm.mean), grad_norm_std=_finite_or_none(self.grad_norm.std))

    def rebaseline(self) -> None:
        """Forget the window: skips that persist mean the parameters moved into a new regime (or a
        bad one that skipping cannot leave); judging new steps against the old window would skip
        forever. Detection resumes once min_history steps have been accepted again."""
        self.loss.values.clear()
        self.grad_norm.values.clear()

    def accept(self, loss: float, grad_norm: float) -> None:
        self.loss.add(loss)
        self.grad_norm.add(grad_norm)

    def state_dict(self) -> dict:
        return {"loss": list(self.loss.values), "grad_norm": list(self.grad_norm.values)}

    def load_state_dict(self, state: dict) -> None:
        self.loss.values.clear()
        self.grad_norm.values.clear()
        for v in state["loss"]:
            self.loss.add(v)
        for v in state["grad_norm"]:
            self.grad_norm.add(v)


@dataclass
class RollbackPolicy:
    """Skips that persist (more than max_skips inside skip_window iterations) call for a rollback,
    at most max_rollbacks times a run."""

    max_skips: int = 3
    skip_window: int = 50
    max_rollbacks: int = 2
    spike_iterations: list = field(default_factory=list)
    rollbacks: list = field(default_factory=list)

    @classmethod
    def from_config(cls, spike_cfg) -> "RollbackPolicy":
        return cls(spike_cfg.spike_max_skips, spike_cfg.spike_skip_window, spike_cfg.spike_max_rollbacks)

    def record_spike(self, iteration: int) -> None:
        self.spike_iterations.append(iteration)

    def recent_spikes(self, iteration: int) -> list[int]:
        return [i for i in self.spike_iterations if iteration - self.skip_window < i <= iteration]

    def wants_rollback(self, iteration: int) -> bool:
        return len(self.recent_spikes(iteration)) > self.max_skips

    @property
    def exhausted(self) -> bool:
        return len(self.rollbacks) >= self.max_rollbacks

    def record_rollback(self, iteration: int, to_iteration: int, spikes: list[int]) -> None:
        self.rollbacks.append({"iteration": iteration, "to_iteration": to_iteration, "spike_iterations": spikes})
        self.forget(spikes)

    def forget(self, spikes: list[int]) -> None:
        """The window starts afresh after a rollback or re-baseline: the same spikes must not
        trigger another."""
        self.spike_iterations = [i for i in self.spike_iterations if i not in spikes]

    def state_dict(self) -> dict:
        return {"spike_iterations": list(self.spike_iterations), "rollbacks": list(self.rollbacks)}

    def load_state_dict(self, state: dict) -> None:
        self.spike_iterations = list(state["spike_iterations"])
        self.rollbacks = list(state["rollbacks"])
