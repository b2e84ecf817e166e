"""Spikes, NaNs, rollback and exact resume under tp 2 x pp 2 x dp 2 (one torchrun launch).

Synthetic data; the planted-junk-documents test lives in test_planted_spikes.py.
"""

import json
import math

import pytest
from safetensors.torch import load_file, save_file

from tests.launch import run_scenarios

pytestmark = pytest.mark.slow

LAYOUT = {"tp": 2, "pp": 2, "lr_warmup_iters": 2, "eval_interval": 0}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stability")
    a = str(tmp / "ckpt_a")
    # a rollback run: bad samples (stream positions) in the batches of iterations 12..15
    bad = ",".join(f"5:s{(it - 1) * 16 + 3}" for it in (12, 13, 14, 15))
    scenarios = [
        {"name": "straight", "overrides": LAYOUT | {"train_iters": 10, "save": a, "save_interval": 5,
                                                     "log_dir": str(tmp / "log_straight")}},
        {"name": "resumed", "load": a + "/iter_0000005",
         "overrides": LAYOUT | {"train_iters": 10, "log_dir": str(tmp / "log_resumed")}},
        {"name": "cross_layout", "load": a + "/iter_0000005",
         "overrides": LAYOUT | {"tp": 1, "pp": 4, "train_iters": 6, "log_dir": str(tmp / "log_cross")}},
        {"name": "nan_one_rank", "env": {"MEGALLM_INJECT_NAN": "5:3"},
         "overrides": LAYOUT | {"train_iters": 5, "log_dir": str(tmp / "log_nan")}},
        {"name": "nan_one_rank_warn", "env": {"MEGALLM_INJECT_NAN": "5:3"},
         "overrides": LAYOUT | {"train_iters": 4, "spike_action": "warn", "log_dir": str(tmp / "log_nan_warn")}},
        # bf16 + distributed optimizer: the skip leaves bf16 weights, fp32 masters and moments as they were
        {"name": "nan_one_rank_bf16_zero1", "env": {"MEGALLM_INJECT_NAN": "5:3"}, "unchanged_step": 3,
         "overrides": LAYOUT | {"train_iters": 4, "bf16": True, "use_distributed_optimizer": True,
                                "log_dir": str(tmp / "log_nan_bf16")}},
        {"name": "rollback", "env": {"MEGALLM_INJECT_NAN": bad},
         "overrides": LAYOUT | {"train_iters": 20, "save": str(tmp / "ckpt_rb"), "save_interval": 5,
                                "spike_action": "rollback", "spike_max_skips": 3, "spike_skip_window": 50,
                                "spike_rollback_skip_samples": 32, "log_dir": str(tmp / "log_rb")}},
    ]
    return tmp, run_scenarios(8, tmp, scenarios, timeout=900)


def losses(run, start=1):
    return {r["iteration"]: r["loss"] for r in run["records"] if r["iteration"] >= start}


def test_resume_is_bitwise_exact(runs):
    _, r = runs
    assert r["resumed"]["loaded_iteration"] == 5
    straight, resumed = losses(r["straight"], 6), losses(r["resumed"])
    assert list(resumed) == [6, 7, 8, 9, 10]
    assert resumed == straight  # == on floats: bitwise
    assert [x["grad_norm"] for x in r["resumed"]["records"]] == [x["grad_norm"] for x in r["straight"]["records"][5:]]


def test_checkpoint_from_tp2_pp2_resumes_at_tp1_pp4(runs):
    _, r = runs
    # a different layout sums in a different order: equal within fp32 rounding, not bitwise
    assert losses(r["cross_layout"])[6] == pytest.approx(losses(r["straight"])[6], rel=1e-6)


def test_nan_on_one_rank_skips_on_all_ranks(runs):
    tmp, r = runs
    recs = r["nan_one_rank"]["records"]
    assert [x["skipped"] for x in recs] == [False, False, True, False, False]
    assert recs[2]["skip_reason"] == "nonfinite_grad"
    assert recs[2]["consumed_samples"] == 48  # the skipped batch counts as consumed
    assert recs[3]["lr"] == recs[2]["lr"]  # the schedule did not advance on the skip
    spikes = [json.loads(line) for line in (tmp / "log_nan" / "spikes.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in spikes] == [3] and spikes[0]["samples"] == list(range(32, 48))


def test_warn_still_skips_a_nonfinite_gradient(runs):
    """spike_action=warn lets finite spikes through, but a NaN gradient's update would make every
    weight NaN: it is skipped, and training goes on with finite losses."""
    _, r = runs
    recs = r["nan_one_rank_warn"]["records"]
    assert [x["skipped"] for x in recs] == [False, False, True, False]
    assert recs[2]["skip_reason"] == "nonfinite_grad" and math.isfinite(recs[3]["loss"])
    assert recs[3]["loss"] == r["nan_one_rank"]["records"][3]["loss"]  # as under skip


def test_skip_leaves_bf16_weights_masters_and_moments_untouched(runs):
    _, r = runs
    run = r["nan_one_rank_bf16_zero1"]
    assert [x["skipped"] for x in run["records"]] == [False, False, True, False]
    assert all(skipped == [3] for skipped in run["skipped_per_rank"])
    for rank, w in enumerate(run["watched_step"]):
        assert w["unchanged"] and w["tensors"] > 0, rank


def test_persistent_spikes_roll_back_and_move_past_the_bad_data(runs):
    tmp, r = runs
    run = r["rollback"]
    assert "error" not in run, run.get("error")
    events = [json.loads(line) for line in (tmp / "log_rb" / "events.jsonl").read_text().splitlines()]
    rollbacks = [e for e in events if e["event"] == "rollback"]
    assert len(rollbacks) == 1
    rb = rollbacks[0]
    # 4 skips (> spike_max_skips=3) at iterations 12..15 -> newest checkpoint before 12 is iteration 10
    assert rb["spike_iterations"] == [12, 13, 14, 15] and rb["to_iteration"] == 10
    assert rb["consumed_samples_after"] == 15 * 16 + 32  # past the bad window, plus the extra samples
    its = [x["iteration"] for x in run["records"]]
    assert its[:15] == list(range(1, 16)) and its[15:] == list(range(11, 21))  # trained on to the end
    after = run["records"][15:]
    assert not any(x["skipped"] for x in after)
    # the LR schedule is back where it stood at iteration 10: iterations 11 and 12 (skipped before,
    # so no scheduler step between them) get the learning rates they had the first time
    first = {x["iteration"]: x["lr"] for x in run["records"][:15]}
    assert [after[0]["lr"], after[1]["lr"]] == [first[11], first[12]]
    assert after[2]["lr"] != first[13]
    assert after[0]["consumed_samples"] == 15 * 16 + 32 + 16
    assert run["iteration"] == 20


def test_spike_records_carry_statistics_and_samples(runs):
    tmp, _ = runs
    rec = [json.loads(line) for line in (tmp / "log_rb" / "spikes.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in rec] == [12, 13, 14, 15]
    assert [s["action"] for s in rec] == ["skip", "skip", "skip", "rollback"]
    for s in rec:
        assert s["consumed_samples_end"] - s["consumed_samples_start"] == 16
        assert s["samples"] == list(range(s["consumed_samples_start"], s["consumed_samples_end"]))
        for key in ("loss", "loss_mean", "loss_std", "loss_zscore", "grad_zscore", "grad_norm", "lr", "reason"):
            assert key in s
