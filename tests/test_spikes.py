"""The spike detector's statistics and decisions, on exact numbers and on a recorded run of the
tiny model (bench/traces/), and the rollback rule."""

import json
import math
import statistics
from pathlib import Path

import pytest

from megallm.training.spikes import (
    MAD_TO_SIGMA,
    MEGATRON_FACTOR,
    METHODS,
    EmaResidual,
    MeanStd,
    MedianMAD,
    RollbackPolicy,
    SpikeDetector,
    Trend,
    replay,
)

TRACES = Path(__file__).resolve().parents[1] / "bench" / "traces"


def filled(stat, values):
    for v in values:
        stat.add(v)
    return stat


def test_statistics_on_exact_numbers():
    assert MeanStd(4).values.maxlen == 4
    m = filled(MeanStd(4), [1.0, 2.0, 3.0, 4.0, 5.0])  # the window keeps the last 4
    assert list(m.values) == [2.0, 3.0, 4.0, 5.0]
    assert m.center_scale() == pytest.approx((3.5, math.sqrt(5 / 3)))  # sample std, as before
    # median 3, absolute deviations [2, 1, 0, 1, 97] -> MAD 1: one outlier moves neither
    assert filled(MedianMAD(8), [1.0, 2.0, 3.0, 4.0, 100.0]).center_scale() == pytest.approx((3.0, MAD_TO_SIGMA))
    # a falling line with one outlier: the trend extrapolates the line one step, the scale ignores it
    line = [10.0 - 0.5 * i for i in range(20)]
    line[7] += 50.0
    center, scale = filled(Trend(64), line).center_scale()
    assert center == pytest.approx(10.0 - 0.5 * 20) and scale == pytest.approx(0.0, abs=1e-12)
    e = filled(EmaResidual(8), [2.0, 2.0, 2.0, 4.0])  # residuals 0, 0, 0, 2; EMA after 4: 2 + 2/17 * 2
    center, scale = e.center_scale()
    assert e.ema == pytest.approx(2.0 + 4 / 17) and center == pytest.approx(e.ema)  # median residual 0
    assert scale == pytest.approx(0.0)


def detector(method="trend", n=40, **kw):
    """Fed a noisy falling loss (3.0 -> 2.6) and a flat grad norm."""
    d = SpikeDetector(window=64, min_history=16, method=method, **{"zscore": 6.0, "grad_zscore": 6.0, **kw})
    for i in range(n):
        d.accept(3.0 - 0.01 * i + 0.01 * (i % 5 - 2), 1.0 + 0.02 * (i % 3 - 1))
    return d


def test_inactive_until_min_history_except_nonfinite():
    d = detector(n=15)
    assert not d.active and not d.evaluate(100.0, 50.0).spike
    assert d.evaluate(math.nan, 1.0).reason == "nonfinite_loss"
    assert d.evaluate(3.0, math.inf).reason == "nonfinite_grad"
    assert d.evaluate(3.0, 1.0, nonfinite_elsewhere=True).reason == "nonfinite_grad"  # a NaN on another rank


@pytest.mark.parametrize("method", ["trend", "mad", "ema"])
def test_robust_z_of_log_loss_flags_only_upwards(method):
    d = detector(method)
    probe = d.evaluate(2.6, 1.0)
    center, scale = math.log(probe.loss_mean), probe.loss_std / probe.loss_mean  # back to the log domain
    just_under, just_over = math.exp(center + 5.9 * scale), math.exp(center + 6.1 * scale)
    assert not d.evaluate(just_under, 1.0).spike
    over = d.evaluate(just_over, 1.0)
    assert over.reason == "loss_zscore" and over.loss_zscore == pytest.approx(6.1) and over.method == method
    assert not d.evaluate(0.5 * probe.loss_mean, 1.0).spike  # a sudden drop is progress
    g = d.evaluate(probe.loss_mean, 1.5)  # 1.5x the grad norm: log z far above 6
    assert g.reason == "grad_zscore" and g.grad_zscore > 6


def test_the_trend_does_not_inflate_the_scale_during_the_early_drop():
    """The loss falling 8.3 -> 6.5 in 30 steps: mean/std sees the fall as noise, the trend does not."""
    losses = [6.5 + 1.8 * math.exp(-i / 10) + 0.03 * ((i * 7) % 5 - 2) for i in range(30)]
    old, new = SpikeDetector(64, 16, method="meanstd"), SpikeDetector(64, 16, method="trend")
    for x in losses:
        old.accept(x, 1.0)
        new.accept(x, 1.0)
    spike = 1.4 * statistics.median(losses[-20:])
    assert old.evaluate(spike, 1.0).loss_zscore < 6 < new.evaluate(spike, 1.0).loss_zscore


def test_a_missed_spike_enters_clipped_and_cannot_hide_the_next():
    d = detector("mad")
    before = d.evaluate(2.6, 1.0)
    near_miss = math.exp(math.log(before.loss_mean) + 5 * before.loss_std / before.loss_mean)  # z 5: not flagged
    for k in range(3):
        dec = d.evaluate(near_miss, 1.0)
        assert not dec.spike
        d.observe(dec)
        if k == 0:  # enters at the suspicious bound (z 3) of the window it was judged against
            bound = math.log(before.loss_mean) + 3.0 * before.loss_std / before.loss_mean
            assert d.loss.values[-1] == pytest.approx(bound)
    after = d.evaluate(2.6, 1.0)
    assert after.loss_std < 1.5 * before.loss_std  # without clipping the three near-misses widen it more
    unclipped = detector("mad", suspicious=None)
    for _ in range(3):
        unclipped.observe(unclipped.evaluate(near_miss, 1.0))
    assert unclipped.loss.values[-1] == pytest.approx(math.log(near_miss))


def test_published_rules():
    olmo = SpikeDetector(window=64, min_history=16, zscore=3.0, method="olmo")
    assert (olmo.window, olmo.zscore_threshold, olmo.log, olmo.suspicious) == (128, 6.0, False, None)
    for i in range(20):
        olmo.observe(olmo.evaluate(3.0 + 0.01 * (i % 3), 1.0))
    flagged = olmo.evaluate(10.0, 1.0)
    olmo.observe(flagged)
    assert flagged.spike and olmo.loss.values[-1] == 10.0  # OLMo-core's window learns flagged steps too
    mega = SpikeDetector(method="megatron")
    for i in range(150):
        mega.observe(mega.evaluate(8.0 if i == 0 else 3.0, 1.0))
    assert len(mega.loss) == 100 and mega.zscore_threshold == MEGATRON_FACTOR
    assert not mega.evaluate(79.0, 1e6).spike  # 10x the largest early loss (8.0); grad norm ignored
    assert mega.evaluate(81.0, 1.0).loss_zscore == pytest.approx(81 / 8)


@pytest.mark.parametrize("method", METHODS)
def test_state_round_trips_through_json_and_is_bounded(method):
    d = detector(method, n=300)
    d.observe(d.evaluate(2.0, 1.0))
    state = json.loads(json.dumps(d.state_dict()))
    bound = max(d.window, 100)  # the window, or Megatron's first 100 losses
    assert len(state["loss"]["values"]) <= bound and len(state["grad_norm"]["values"]) <= bound
    e = SpikeDetector(window=64, min_history=16, method=method)
    e.load_state_dict(state)
    for x in (2.5, 3.5, 9.0):
        assert e.evaluate(x, 1.1) == d.evaluate(x, 1.1)  # exact resume
    before = d.state_dict()
    d.evaluate(1e9, 1e9)
    assert d.state_dict() == before  # evaluate never changes the window


def test_old_checkpoints_and_another_method_start_cleanly():
    old = {"loss": [3.0, 3.1, 2.9] * 10, "grad_norm": [1.0] * 30}  # before the method choice: mean/std
    d = SpikeDetector(window=64, min_history=16, method="meanstd")
    d.load_state_dict(old)
    assert list(d.loss.values) == old["loss"] and d.active
    t = SpikeDetector(window=64, min_history=16, method="trend")
    t.load_state_dict(old)  # another method's window means nothing to the trend: start over
    assert len(t.loss) == 0 and not t.active


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="spike method 'median'"):
        SpikeDetector(method="median")


def load_trace(name):
    rows = [json.loads(line) for line in (TRACES / f"{name}.jsonl").read_text().splitlines()]
    return rows[0], rows[1:]


def test_default_catches_the_issues_junk_batches_and_the_old_rule_does_not():
    """The recorded run of the issue (batch of one sequence, random-subword documents, lr 1e-2,
    beta2 0.999): every batch that is all junk is flagged by the default; mean/std misses some."""
    header, rows = load_trace("junkdocs_s1234")
    assert header["overrides"]["lr"] == 0.01 and header["overrides"]["adam_beta2"] == 0.999
    junk = [r["iteration"] for r in rows if r["junk_fraction"] == 1.0]
    assert len(junk) >= 5

    def flagged(method):
        d = SpikeDetector(window=64, min_history=16, method=method, zscore=5.0 if method == "ema" else 6.0,
                          grad_zscore=10.0 if method == "ema" else 6.0)
        decisions = replay(((r["iteration"], r["loss"], r["grad_norm"]) for r in rows), d, RollbackPolicy())
        return {r["iteration"] for r, dec in zip(rows, decisions) if dec.spike}

    assert set(junk) <= flagged("ema")
    assert not set(junk) <= flagged("meanstd")
    assert len(flagged("ema") - set(junk)) <= 0.01 * len(rows)  # others: at most 1% of the run


def test_persistent_spikes_rebaseline_in_replay():
    """A level shift (3.0 -> 4.0 for good): skips persist, the policy re-baselines, detection resumes."""
    d, p = SpikeDetector(window=64, min_history=16), RollbackPolicy(max_skips=3, skip_window=50)
    values = [(i, 3.0 + 0.01 * (i % 3), 1.0) for i in range(1, 41)] + \
             [(i, 4.0 + 0.01 * (i % 3), 1.0) for i in range(41, 101)]
    flags = [i for (i, _, _), dec in zip(values, replay(values, d, p)) if dec.spike]
    assert flags == [41, 42, 43, 44]  # the 4th spike within 50 iterations re-baselines
    assert d.active and not d.evaluate(4.01, 1.0).spike


def test_rollback_after_more_than_max_skips_inside_window():
    p = RollbackPolicy(max_skips=3, skip_window=50, max_rollbacks=1)
    for it in (10, 30, 55):
        p.record_spike(it)
        assert not p.wants_rollback(it)
    p.record_spike(59)
    assert p.recent_spikes(59) == [10, 30, 55, 59] and p.wants_rollback(59)
    p.record_spike(200)
    assert p.recent_spikes(200) == [200]  # old spikes fell out of the window
    p.record_rollback(59, 40, [10, 30, 55, 59])
    assert p.spike_iterations == [200] and len(p.rollbacks) == 1
