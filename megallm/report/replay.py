"""The spike detector replayed over a finished run's metrics, in execution order.

The report and `spike_report.py --replay` call the training loop's own detector
(megallm.training.spikes.SpikeDetector) on the logged global loss and grad norm, so the report's
window statistics are the detector's, and a replay with another method or threshold shows what
that rule would have flagged on the same numbers. A rollback (an iteration number going back)
restores the detector and skip history saved at the checkpoint it went back to, as the loop does.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

from megallm.training.spikes import RollbackPolicy, SpikeDecision, SpikeDetector


def _number(x) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def logged_spike(record: dict) -> Optional[bool]:
    """What the run's detector decided, when the metrics say it (JSON logs carry skip_reason, set
    for every flagged step, applied or not); None when they cannot (TensorBoard-only logs)."""
    loss = _number(record.get("loss"))
    if record.get("skipped") or (loss is not None and not math.isfinite(loss)):
        return True
    if "skip_reason" not in record:
        return None
    return record["skip_reason"] is not None


def replay_metrics(metrics: list[dict], spike_cfg, save_interval: int = 0,
                   follow_log: bool = True) -> list[Optional[SpikeDecision]]:
    """One decision per metrics record (None for records without a loss).

    follow_log: the window learns what the run's detector learnt (the logged decisions), so the
    statistics are the run's; False: the replayed detector's own decisions drive it, as they would
    have in a run with spike_cfg (the later losses stay the recorded ones)."""
    detector, policy = SpikeDetector.from_config(spike_cfg), RollbackPolicy.from_config(spike_cfg)
    saved: dict[int, tuple[dict, dict]] = {0: (detector.state_dict(), policy.state_dict())}
    out: list[Optional[SpikeDecision]] = []
    previous = 0
    for r in metrics:
        loss, grad_norm = _number(r.get("loss")), _number(r.get("grad_norm"))
        if loss is None:
            out.append(None)
            continue
        it = r["iteration"]
        if it <= previous:  # a rollback: back to the newest checkpoint before this iteration
            back = max((k for k in saved if k < it), default=0)
            detector.load_state_dict(copy.deepcopy(saved[back][0]))
            policy.load_state_dict(copy.deepcopy(saved[back][1]))
        previous = it
        grad_norm = grad_norm if grad_norm is not None else math.nan if not math.isfinite(loss) else 0.0
        elsewhere = str(r.get("skip_reason") or "").startswith("nonfinite")
        d = detector.evaluate(loss, grad_norm, nonfinite_elsewhere=elsewhere)
        logged = logged_spike(r) if follow_log else None
        flagged = d.spike if logged is None else logged
        if flagged:
            if not d.spike:  # the logged decision wins; the statistics stay the detector's
                d.spike, d.reason = True, r.get("skip_reason") or "logged"
            detector.observe(d)
            policy.record_spike(it)
            if spike_cfg.spike_action == "skip" and policy.wants_rollback(it):
                policy.forget(policy.recent_spikes(it))
                detector.rebaseline()
        else:
            d.spike, d.reason = False, None
            detector.observe(d)
        out.append(d)
        if save_interval and it % save_interval == 0:
            saved[it] = (detector.state_dict(), policy.state_dict())
    return out


def _short(its: list[int], limit: int = 20) -> str:
    if not its:
        return "none"
    return ", ".join(str(i) for i in its[:limit]) + (f" (+{len(its) - limit} more)" if len(its) > limit else "")


def compare(run, overrides: dict) -> dict:
    """What a detector (the run's spike config with `overrides`) flags over the run's metrics,
    next to what the run flagged."""
    from megallm.config import Config, ConfigError, apply_overrides, validate

    cfg = copy.deepcopy(run.config) if run.config is not None else Config()
    try:
        apply_overrides(cfg, overrides, where="replay flags")
    except ConfigError as e:
        from megallm.report.logs import ReportError
        raise ReportError(str(e)) from e
    errors = [e for e in validate(cfg) if e.startswith("spike_")]
    if errors:
        from megallm.report.logs import ReportError
        raise ReportError(errors[0])
    decisions = replay_metrics(run.metrics, cfg.spike, cfg.checkpoint.save_interval, follow_log=False)
    steps = [(r, d) for r, d in zip(run.metrics, decisions) if d is not None]
    ran = [r["iteration"] for r, _ in steps if logged_spike(r)]
    flagged = [{"iteration": r["iteration"], **d.to_dict()} for r, d in steps if d.spike]
    rep = [f["iteration"] for f in flagged]
    s = cfg.spike
    shown = ("spike_method", "spike_zscore", "spike_grad_zscore", "spike_window", "spike_min_history",
             "spike_log_loss", "spike_suspicious_zscore")
    return {"steps": len(steps), "detector": ", ".join(f"{name}={getattr(s, name)}" for name in shown),
            "run": ran, "replay": rep, "run_text": _short(ran), "replay_text": _short(rep),
            "both": sorted(set(ran) & set(rep)), "only_run": _short(sorted(set(ran) - set(rep))),
            "only_replay": _short(sorted(set(rep) - set(ran))), "flagged": flagged}
