"""The planner's per-rank memory prediction against what real CPU runs hold, rank by rank.

One 8-process launch (tests/distributed/memory_worker.py) runs one iteration of configs/tiny.yaml
in several layouts and measures each rank by tensor storage: parameters, weights, gradients (the
fp32 main-grad buffer), the optimizer state and fp32 masters after the step, and the peak of the
bytes autograd holds for backward during the pipeline schedule.

Tolerances, and why:
- model state (weights, main grads, masters, Adam moments; megallm's engine has no separate
  gradient buckets: the reduction works on the grad buffer in place): within 1% of the planner
  per rank and per category, fp32 and bf16, with and without the distributed optimizer. Measured:
  exact for these layouts, because every chunk's element count divides by dp, so the flat buffers
  need no padding and the distributed optimizer's shares are exactly even.
- activations (fp32 and bf16 layouts): within 0.5%. The planner's count covers the saved tensors
  (layers, ids and RoPE tables, head) plus the chunk outputs torch pipelining keeps (in bf16 the
  last chunk's bf16 logits too), which are not saved tensors and are taken out before comparing.
  Measured leftovers: 128 B per micro-batch on the last stage (the cross-entropy's boolean target
  mask) and under 2 KiB per micro-batch on pipeline rank 0; the worst case is 0.13%. The peak
  itself shows the schedule's micro-batches in flight: 1F1B at pp 4 holds 4, 3, 2 and 1 of them on
  pipeline ranks 0 to 3.
"""

from pathlib import Path

import pytest

from tests.launch import run_scenarios

pytestmark = pytest.mark.slow

BASE = {"train_iters": 1, "lr_warmup_iters": 0, "eval_interval": 0}
LAYOUTS = {
    "tp2_pp2_dp2_zero1": {"tp": 2, "pp": 2, "use_distributed_optimizer": True},
    "tp1_pp4_dp2": {"tp": 1, "pp": 4},
    "tp2_pp2_vpp2_dp2": {"tp": 2, "pp": 2, "vpp": 2},
    "tp2_pp4_dp1": {"tp": 2, "pp": 4},
}
# model state only: bf16 parameters and activations, fp32 main grads, masters and moments
BF16_LAYOUTS = {
    "tp2_pp2_dp2_bf16": {"tp": 2, "pp": 2, "bf16": True},
    "tp2_pp2_dp2_bf16_zero1": {"tp": 2, "pp": 2, "bf16": True, "use_distributed_optimizer": True},
}
STATE_PARTS = ("weights", "gradients", "master_weights", "optimizer")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("memory")
    scenarios = [{"name": name, "overrides": BASE | layout | {"log_dir": str(tmp / name)}}
                 for name, layout in (LAYOUTS | BF16_LAYOUTS).items()]
    return run_scenarios(8, tmp, scenarios, worker="tests/distributed/memory_worker.py")


@pytest.mark.parametrize("layout", list(LAYOUTS | BF16_LAYOUTS))
def test_parameters_and_model_state_within_one_percent(runs, layout):
    for r in runs[layout]["ranks"]:
        m, p = r["measured"], r["predicted"]
        assert m["parameters"] == p["parameters"], r["rank"]
        for part in STATE_PARTS:
            want = p["model_state"][part]
            assert abs(m[part] - want) <= 0.01 * want, (r["rank"], part, m[part], want)
        total = sum(m[part] for part in STATE_PARTS)
        assert abs(total - p["model_state"]["total"]) <= 0.01 * p["model_state"]["total"]


def test_bf16_state_bytes_per_parameter(runs):
    """2 (bf16 weight) + 4 (fp32 main grad) + 12 (master + Adam) without the distributed optimizer,
    2 + 4 + 12/dp with it: the numbers Megatron's mixed precision is known by."""
    for name, sharded_by in (("tp2_pp2_dp2_bf16", 1), ("tp2_pp2_dp2_bf16_zero1", 2)):
        for r in runs[name]["ranks"]:
            m = r["measured"]
            assert m["weights"] == 2 * m["parameters"] and m["gradients"] == 4 * m["parameters"]
            assert m["master_weights"] + m["optimizer"] == 12 * m["parameters"] // sharded_by, (name, r["rank"])


def test_distributed_optimizer_shards_state_evenly(runs):
    ranks = runs["tp2_pp2_dp2_zero1"]["ranks"]
    # rank = tp_rank + 2 * (dp_rank + 2 * pp_rank): ranks r and r + 2 are one data-parallel pair,
    # and each keeps Adam's 8 B for exactly half of the stage's parameters
    for first in (0, 1, 4, 5):
        pair = [ranks[first], ranks[first + 2]]
        assert [r["measured"]["optimizer"] for r in pair] == [8 * r["measured"]["parameters"] // 2 for r in pair]


@pytest.mark.parametrize("layout", LAYOUTS | BF16_LAYOUTS)
def test_activation_peak_within_half_a_percent(runs, layout):
    for r in runs[layout]["ranks"]:
        a = r["predicted"]["activations"]
        saved = a["total"] - a["pipeline"]  # the stage outputs pipelining keeps are not saved tensors
        measured = r["measured"]["activation_peak_bytes"]
        assert abs(measured - saved) <= 0.005 * saved, (r["rank"], measured, saved)


@pytest.mark.parametrize("layout", LAYOUTS | BF16_LAYOUTS)
def test_no_receive_buffer_outlives_its_use(runs, layout):
    """After a step the pipeline stages hold no receive buffer. torch.distributed.pipelining alone
    keeps one per micro-batch for each stage's input and output gradient (8 or 16 micro-batches here):
    for the 70B recipe, 512 of 16 MiB each, 16 GiB on every middle pipeline rank."""
    for r in runs[layout]["ranks"]:
        m = r["measured"]
        assert m["receive_records"] == m["expected_receive_records"] > 0, (r["rank"], m)
        assert m["receive_bytes_described"] > 0 and m["receive_buffer_bytes"] == 0, (r["rank"], m)


def test_one_f_one_b_holds_pp_minus_rank_micro_batches(runs):
    ranks = runs["tp1_pp4_dp2"]["ranks"]
    assert [ranks[2 * k]["predicted"]["chunks_in_flight"] for k in range(4)] == [4, 3, 2, 1]
    # pipeline ranks 1 and 2 hold one layer each and no embedding or head: the peak is in-flight x one
    per_micro_batch = ranks[4]["measured"]["activation_peak_bytes"] / 2
    assert ranks[2]["measured"]["activation_peak_bytes"] == 3 * per_micro_batch


# Sequence parallelism and activation recompute: what autograd keeps, per rank, against the
# planner's count for the same flags. A second launch, so these layouts do not slow the first.
FEATURES = {
    "tp2_pp2_dp2_sp": {"tp": 2, "pp": 2, "sequence_parallel": True},
    "tp2_pp2_dp2_selective": {"tp": 2, "pp": 2, "recompute_granularity": "selective",
                              "recompute_modules": ["layernorm", "swiglu"]},
    "tp2_pp2_dp2_sp_selective_mlp": {"tp": 2, "pp": 2, "sequence_parallel": True,
                                     "recompute_granularity": "selective", "recompute_modules": ["mlp"]},
    "tp2_pp2_dp2_full_uniform": {"tp": 2, "pp": 2, "recompute_granularity": "full", "recompute_method": "uniform",
                                 "recompute_num_layers": 1},
    "tp2_pp2_dp2_sp_full_block": {"tp": 2, "pp": 2, "sequence_parallel": True, "recompute_granularity": "full",
                                  "recompute_method": "block", "recompute_num_layers": 1},
}


@pytest.fixture(scope="module")
def feature_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("memory_features")
    scenarios = [{"name": name, "overrides": BASE | layout | {"log_dir": str(tmp / name)}}
                 for name, layout in FEATURES.items()]
    return run_scenarios(8, tmp, scenarios, worker="tests/distributed/memory_worker.py", timeout=1200)


@pytest.mark.parametrize("layout", FEATURES)
def test_sequence_parallel_and_recompute_activations_within_one_percent(feature_runs, layout):
    """Saved tensors per rank within 1% of the planner. Full recompute's re-run of one unit in
    backward happens inside torch.utils.checkpoint, whose own hooks hold those tensors where
    saved-tensor hooks cannot see them: the planner's `recompute` part is left out here.

    Measured leftovers, as in the first launch: the embedding's boolean mask and token ids on
    pipeline rank 0 (1,280 B over the two micro-batches in flight), the cross-entropy's target
    mask on the last stage (128 B). Worst case 0.43% (pipeline rank 0 under full uniform recompute,
    whose kept set is small); the sequence-parallel layouts 0.05-0.12%, on every rank. Under
    sequence parallelism the embedding output's slice is cloned (megallm.model.llama, as Megatron's
    clone_scatter_output_in_embedding): the slice alone kept the whole [s, b, h] output alive,
    s*b*h*(1 - 1/tp) bytes per micro-batch more than planned."""
    for r in feature_runs[layout]["ranks"]:
        a = r["predicted"]["activations"]
        saved = a["total"] - a["pipeline"] - a["recompute"]
        measured = r["measured"]["activation_peak_bytes"]
        assert abs(measured - saved) <= 0.01 * saved, (r["rank"], measured, saved)
    # the modes are told apart: on rank 0 full recompute keeps far less than selective
    if layout == "tp2_pp2_dp2_full_uniform":
        selective = feature_runs["tp2_pp2_dp2_selective"]["ranks"][0]["measured"]["activation_peak_bytes"]
        assert feature_runs[layout]["ranks"][0]["measured"]["activation_peak_bytes"] < 0.5 * selective
