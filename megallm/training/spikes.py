"""Loss-spike detection: robust z-scores of the loss and the gradient norm, and the rollback rule.

This module is the one owner of the spike rule: the training loop, the spike report (which
re-derives spikes from metrics when spikes.jsonl is missing), the replay (`spike_report.py --replay`)
and the benchmark (bench/spikes.py) all call `SpikeDetector`.

A spike is flagged when, with at least `min_history` accepted iterations in the window,

    z(loss) = (f(loss) - center) / scale           > zscore        or
    z(grad_norm) = (f(norm) - center) / scale      > grad_zscore,

and always when the loss or the gradient is NaN/Inf. f is log when `log_loss` is set (a spike is
then a ratio of losses, whatever the loss level). Only upward deviations
count: a loss that falls fast is progress. `method` chooses center and scale (bench/results/spikes.md
compares them on recorded runs):

    ema       (default) residuals against an exponential moving average (span 16) of the accepted
              values, which follows the initial drop; center = EMA + median residual, scale =
              1.4826 x MAD of the residuals.
    trend     a robust straight line through the window (median of pairwise slopes, median
              intercept) extrapolated one step; scale 1.4826 x the median absolute residual. The
              initial loss drop is a trend, not noise, so it no longer inflates the scale.
    mad       median and 1.4826 x the median absolute deviation.
    meanstd   mean and sample standard deviation (megallm before the benchmark).
    olmo      mean and standard deviation of the last 128 values, 6 sigma, every value learned,
              flagged or not (OLMo-core's rule, as described in megallm issue 17).
    megatron  loss above 10x the largest of the first 100 losses (Megatron-LM's spiky-loss check);
              `zscore` does not apply, the grad norm is not checked.

The window never learns from a flagged value (the caller does not `accept` it), and a value above
the lower `suspicious` z enters clipped to that bound: a near-miss can move the median by one rank,
never widen the spread by its size, so a missed spike cannot hide the next one.

Inputs must be the globally reduced values (identical on all ranks), the "NaN/Inf elsewhere" flag
included (OR-reduced over all ranks by the caller), so that a rank-local NaN skips everywhere.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Optional

METHODS = ("ema", "trend", "mad", "meanstd", "olmo", "megatron")
MAD_TO_SIGMA = 1.4826  # 1 / Phi^-1(3/4): MAD x this estimates sigma for normal noise
EMA_SPAN = 16
OLMO_WINDOW, OLMO_ZSCORE = 128, 6.0
MEGATRON_FACTOR, MEGATRON_EARLY = 10.0, 100


class Statistic:
    """Center and scale of one series' accepted values (in the detector's f-domain)."""

    robust = True  # robust statistics get a scale floor and clip suspicious values

    def __init__(self, window: int):
        self.values: deque[float] = deque(maxlen=window)

    def __len__(self) -> int:
        return len(self.values)

    def add(self, x: float) -> None:
        self.values.append(float(x))

    def clear(self) -> None:
        self.values.clear()

    def center_scale(self) -> tuple[float, float]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"values": list(self.values)}

    def load_state_dict(self, state: dict) -> None:
        self.values.clear()
        self.values.extend(float(v) for v in state["values"])


class MeanStd(Statistic):
    robust = False

    def center_scale(self):
        n = len(self.values)
        if n < 2:
            return math.nan, math.nan
        mean = math.fsum(self.values) / n
        return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in self.values) / (n - 1))


class Olmo(MeanStd):
    """Like MeanStd, but learns every finite value, flagged or not (see SpikeDetector.accept)."""

    learns_flagged = True


class MedianMAD(Statistic):
    def center_scale(self):
        if len(self.values) < 2:
            return math.nan, math.nan
        med = statistics.median(self.values)
        return med, MAD_TO_SIGMA * statistics.median(abs(v - med) for v in self.values)


class Trend(Statistic):
    """A robust line through (position, value): slope is the median of the slopes between points
    half a window apart (n/2 pairs, O(n log n), unlike Theil-Sen's n^2), intercept the median of the
    detrended values; the center is the line one step past the last accepted value."""

    def center_scale(self):
        v = list(self.values)
        n = len(v)
        if n < 4:
            return math.nan, math.nan
        h = n // 2
        slope = statistics.median((v[i + h] - v[i]) / h for i in range(n - h))
        intercept = statistics.median(v[i] - slope * i for i in range(n))
        residuals = [v[i] - intercept - slope * i for i in range(n)]
        bias = statistics.median(residuals)
        return intercept + bias + slope * n, MAD_TO_SIGMA * statistics.median(abs(r - bias) for r in residuals)


class EmaResidual(Statistic):
    """Residuals against an EMA of the accepted values: the EMA follows the trend, the residuals'
    median and MAD give center and scale."""

    def __init__(self, window: int):
        super().__init__(window)
        self.ema: Optional[float] = None

    def add(self, x: float) -> None:
        if self.ema is None:
            self.ema = float(x)
        super().add(float(x) - self.ema)
        self.ema += (2.0 / (EMA_SPAN + 1)) * (float(x) - self.ema)

    def clear(self) -> None:
        super().clear()
        self.ema = None

    def center_scale(self):
        if len(self.values) < 2:
            return math.nan, math.nan
        med = statistics.median(self.values)
        return self.ema + med, MAD_TO_SIGMA * statistics.median(abs(r - med) for r in self.values)

    def state_dict(self) -> dict:
        return {"values": list(self.values), "ema": self.ema}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.ema = state.get("ema")


class EarlyMax(Statistic):
    """The largest of the first MEGATRON_EARLY accepted values; its 'z' is the ratio to it."""

    robust = False

    def __init__(self, window: int):
        super().__init__(MEGATRON_EARLY)
        self.seen = 0

    def add(self, x: float) -> None:
        if self.seen < MEGATRON_EARLY:
            super().add(x)
        self.seen += 1

    def clear(self) -> None:
        pass  # the early maximum is a property of the run's start; re-baselining keeps it

    def center_scale(self):
        return (max(self.values), math.nan) if self.values else (math.nan, math.nan)

    def state_dict(self) -> dict:
        return {"values": list(self.values), "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.seen = int(state.get("seen", len(self.values)))


STATISTICS = {"trend": Trend, "mad": MedianMAD, "ema": EmaResidual, "meanstd": MeanStd, "olmo": Olmo,
              "megatron": EarlyMax}


@dataclass
class SpikeDecision:
    spike: bool
    reason: Optional[str]  # loss_zscore | grad_zscore | nonfinite_loss | nonfinite_grad
    loss: float
    grad_norm: float
    loss_zscore: Optional[float]
    grad_zscore: Optional[float]
    loss_mean: Optional[float]  # the window's center, as a loss (median or trend for robust methods)
    loss_std: Optional[float]  # the window's scale, as a loss (sigma-equivalent)
    grad_norm_mean: Optional[float]
    grad_norm_std: Optional[float]
    method: str = "ema"

    def to_dict(self) -> dict:
        return asdict(self)


def _finite_or_none(x: Optional[float]) -> Optional[float]:
    return None if x is None or math.isnan(x) else x


class SpikeDetector:
    def __init__(self, window: int = 128, min_history: int = 32, zscore: float = 5.0, grad_zscore: float = 10.0,
                 method: str = "ema", log_loss: bool = True, suspicious: Optional[float] = 3.0):
        if method not in STATISTICS:
            raise ValueError(f"spike method {method!r}: must be one of {', '.join(METHODS)}")
        if method == "olmo":
            window, zscore, grad_zscore = OLMO_WINDOW, OLMO_ZSCORE, OLMO_ZSCORE
        self.method, self.window, self.min_history = method, window, min_history
        self.zscore_threshold = MEGATRON_FACTOR if method == "megatron" else zscore
        self.grad_zscore_threshold = grad_zscore
        self.log = log_loss and STATISTICS[method].robust
        self.suspicious = suspicious if STATISTICS[method].robust else None
        self.loss = STATISTICS[method](window)
        self.grad_norm = STATISTICS[method](window)
        self._last: Optional[tuple] = None  # (loss, grad_norm, loss z, grad z) of the last evaluate

    @classmethod
    def from_config(cls, spike_cfg) -> SpikeDetector:
        return cls(spike_cfg.spike_window, spike_cfg.spike_min_history, spike_cfg.spike_zscore,
                   spike_cfg.spike_grad_zscore, spike_cfg.spike_method, spike_cfg.spike_log_loss,
                   spike_cfg.spike_suspicious_zscore)

    @property
    def active(self) -> bool:
        if self.method == "megatron":
            return len(self.loss) >= 1
        return len(self.loss) >= self.min_history

    # ------------------------------------------------------------------------------------------
    def _f(self, x: float) -> float:
        return math.log(x) if self.log and x > 0 else x

    def _center_scale(self, stat: Statistic) -> tuple[float, float]:
        center, scale = stat.center_scale()
        if stat.robust and math.isfinite(center):
            # A window of identical values (MAD 0) must not make every tiny wobble a spike.
            scale = max(scale, 1e-3 * abs(center), 1e-12)
        return center, scale

    def _zscore(self, stat: Statistic, x: float) -> tuple[float, float, float]:
        """(z, center, scale) of raw value x against stat, in the f-domain."""
        if not (self.active and math.isfinite(x)) or (self.log and x <= 0):
            return math.nan, math.nan, math.nan
        center, scale = self._center_scale(stat)
        fx = self._f(x)
        if self.method == "megatron":
            return (fx / center if center > 0 else math.nan), center, scale
        if math.isnan(scale):
            return math.nan, center, scale
        if scale == 0.0:
            return (0.0 if fx == center else math.copysign(math.inf, fx - center)), center, scale
        return (fx - center) / scale, center, scale

    def _as_value(self, center: float, scale: float) -> tuple[Optional[float], Optional[float]]:
        """The window's center and scale in the raw domain (delta method for log)."""
        if not self.log or not math.isfinite(center):
            return _finite_or_none(center), _finite_or_none(scale)
        c = math.exp(center)
        return c, c * scale if math.isfinite(scale) else None

    def evaluate(self, loss: float, grad_norm: float, nonfinite_elsewhere: bool = False) -> SpikeDecision:
        """Decide without changing the window; `accept` afterwards if the iteration was taken."""
        lz, lc, ls = self._zscore(self.loss, loss)
        gz, gc, gs = (self._zscore(self.grad_norm, grad_norm) if self.method != "megatron"
                      else (math.nan, math.nan, math.nan))
        self._last = (loss, grad_norm, lz, gz)
        if not math.isfinite(loss):
            reason = "nonfinite_loss"
        elif not math.isfinite(grad_norm) or nonfinite_elsewhere:
            reason = "nonfinite_grad"
        elif lz > self.zscore_threshold:
            reason = "loss_zscore"
        elif gz > self.grad_zscore_threshold:
            reason = "grad_zscore"
        else:
            reason = None
        loss_mean, loss_std = self._as_value(lc, ls)
        grad_mean, grad_std = self._as_value(gc, gs)
        return SpikeDecision(
            spike=reason is not None, reason=reason, loss=loss, grad_norm=grad_norm,
            loss_zscore=_finite_or_none(lz), grad_zscore=_finite_or_none(gz),
            loss_mean=loss_mean, loss_std=loss_std, grad_norm_mean=grad_mean, grad_norm_std=grad_std,
            method=self.method)

    def accept(self, loss: float, grad_norm: float) -> None:
        """Learn an iteration that was taken. A value above the suspicious z enters clipped to it."""
        last = self._last if self._last and self._last[:2] == (loss, grad_norm) else None
        lz, gz = (last[2], last[3]) if last else (math.nan, math.nan)
        self._learn(self.loss, loss, lz)
        self._learn(self.grad_norm, grad_norm, gz)

    def observe(self, decision: SpikeDecision) -> None:
        """After the step: learn what the method learns (OLMo-core: every finite value; the
        others: only unflagged ones, which the caller `accept`s). For loops that flag but apply."""
        if not decision.spike:
            self.accept(decision.loss, decision.grad_norm)
        elif getattr(self.loss, "learns_flagged", False) and math.isfinite(decision.loss) \
                and math.isfinite(decision.grad_norm):
            self.loss.add(decision.loss)
            self.grad_norm.add(decision.grad_norm)

    def _learn(self, stat: Statistic, x: float, z: float) -> None:
        if not math.isfinite(x) or (self.log and x <= 0):
            return
        fx = self._f(x)
        if self.suspicious is not None and math.isfinite(z) and z > self.suspicious:
            center, scale = self._center_scale(stat)
            fx = center + self.suspicious * scale
        stat.add(fx)

    def rebaseline(self) -> None:
        """Forget the window: skips that persist mean the parameters moved into a new regime (or a
        bad one that skipping cannot leave); judging new steps against the old window would skip
        forever. Detection resumes once min_history steps have been accepted again."""
        self.loss.clear()
        self.grad_norm.clear()

    def state_dict(self) -> dict:
        """JSON-serialisable and bounded by the window: two lists of at most `window` floats."""
        return {"method": self.method, "log": self.log, "loss": self.loss.state_dict(),
                "grad_norm": self.grad_norm.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if isinstance(state.get("loss"), list):  # checkpoints from before the method choice: raw losses
            state = {"method": "meanstd", "log": False, "loss": {"values": state["loss"]},
                     "grad_norm": {"values": state["grad_norm"]}}
        if state.get("method", self.method) != self.method or bool(state.get("log", self.log)) != self.log:
            # Another method's window (a resume with a new --spike-method) means nothing here: start over.
            self.rebaseline()
            return
        self.loss.load_state_dict(state["loss"])
        self.grad_norm.load_state_dict(state["grad_norm"])
        self._last = None


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
    def from_config(cls, spike_cfg) -> RollbackPolicy:
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


def replay(values, detector: SpikeDetector, policy: Optional[RollbackPolicy] = None,
           action: str = "skip") -> list[SpikeDecision]:
    """The loop's decisions over recorded (loss, grad_norm) pairs, in order: evaluate, learn what
    the loop learns, and with action skip re-baseline on persistent spikes as Trainer.on_spike does.
    `values` yields (iteration, loss, grad_norm). What the run did after a different decision (its
    later losses) cannot be replayed; the inputs are the recorded ones."""
    decisions = []
    for iteration, loss, grad_norm in values:
        d = detector.evaluate(loss, grad_norm)
        detector.observe(d)
        if d.spike and policy is not None:
            policy.record_spike(iteration)
            if action == "skip" and policy.wants_rollback(iteration):
                policy.forget(policy.recent_spikes(iteration))
                detector.rebaseline()
        decisions.append(d)
    return decisions
