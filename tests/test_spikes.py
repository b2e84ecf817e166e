"""The spike detector's statistics and decisions, and the rollback rule, on fake values."""

import math

import pytest

from megallm.training.spikes import RollbackPolicy, RollingStats, SpikeDetector


def test_rolling_stats_window_and_zscore():
    s = RollingStats(window=4)
    for v in [1.0, 2.0, 3.0, 4.0, 5.0]:
        s.add(v)
    assert list(s.values) == [2.0, 3.0, 4.0, 5.0]
    assert s.mean == 3.5 and s.std == pytest.approx(math.sqrt(5 / 3))
    assert s.zscore(3.5 + 2 * s.std) == pytest.approx(2.0)


def fed(n=40, **kw):
    d = SpikeDetector(window=128, min_history=32, **kw)
    for i in range(n):
        d.accept(3.0 + 0.01 * (i % 5), 1.0 + 0.01 * (i % 3))
    return d


def test_inactive_until_min_history_except_nonfinite():
    d = fed(n=31)
    assert not d.active
    assert not d.evaluate(100.0, 50.0).spike
    assert d.evaluate(math.nan, 1.0).reason == "nonfinite_loss"
    assert d.evaluate(3.0, math.inf).reason == "nonfinite_grad"


def test_flags_loss_and_grad_zscores_above_threshold_only_upwards():
    d = fed()
    std = d.loss.std
    assert not d.evaluate(d.loss.mean + 5.9 * std, 1.0).spike
    dec = d.evaluate(d.loss.mean + 6.1 * std, 1.0)
    assert dec.spike and dec.reason == "loss_zscore" and dec.loss_zscore == pytest.approx(6.1)
    assert not d.evaluate(d.loss.mean - 50 * std, 1.0).spike  # a sudden drop is not a spike
    g = d.evaluate(3.0, d.grad_norm.mean + 7 * d.grad_norm.std)
    assert g.reason == "grad_zscore" and g.grad_zscore == pytest.approx(7.0)
    assert d.evaluate(3.0, 1.0, nonfinite_elsewhere=True).reason == "nonfinite_grad"


def test_evaluate_does_not_change_state_and_state_round_trips():
    d = fed()
    before = d.state_dict()
    d.evaluate(1e9, 1e9)
    assert d.state_dict() == before
    e = SpikeDetector(window=128, min_history=32)
    e.load_state_dict(before)
    assert e.evaluate(3.5, 1.0) == d.evaluate(3.5, 1.0)


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
    assert p.exhausted and p.spike_iterations == [200]
