"""Every (tp, pp, dp) layout trains exactly like one process.

Tiny config, fp32, fixed seed and synthetic data, 5 iterations: per-iteration loss equal to the
single-process run within 1e-5 relative (measured: 3e-8), and final weights (gathered into the
layout-free checkpoint) within 1e-5 absolute. Differences come only from the order of
floating-point sums (all-reduce over dp, row-parallel partial sums over tp), hence a tolerance and
not bit equality.

adam_eps is 1e-6 and lr 1e-3 here (the tiny config trains at 3e-3 with eps 1e-8): Adam divides
each element's momentum by its own gradient scale, so an element whose gradient is at the level of
fp32 rounding noise (~1e-9 for some embedding rows of this tiny model) gets an update of order lr
whose sign is noise, in any two runs that sum in a different order; the size of those updates
scales with lr (measured at lr 3e-3: 7e-5 with eps 1e-8, 1.5e-5 with eps 1e-6, always on a
handful of embedding elements). Gradients are compared through the grad norm of every iteration
(1e-4 relative; measured: 1e-7 for iterations 1-4, 5.4e-5 at iteration 5 once Adam has amplified
rounding in a few elements) and Adam's moments after the last one (1e-3 of each tensor's largest value: five steps of
trajectories that differ by rounding, squared in the second moment, measured at most 1.7e-4).
"""

import math

import pytest
import torch

from tests.launch import run_scenarios

pytestmark = pytest.mark.slow

LAYOUTS = {
    "tp2_pp2_dp2": {"tp": 2, "pp": 2},
    "tp2_pp4_dp1": {"tp": 2, "pp": 4},
    # 4 micro-batches of 2 on 4 stages: the first stage runs every forward before any backward,
    # which once tripped DDP's bucket-rebuild assert (see PipelineRunner.warmup)
    "tp1_pp4_dp2_m4": {"tp": 1, "pp": 4, "micro_batch_size": 2},
    "tp1_pp2_dp4": {"tp": 1, "pp": 2},
    "tp1_pp1_dp8": {"tp": 1, "pp": 1},
    "tp2_pp2_dp2_vpp2": {"tp": 2, "pp": 2, "vpp": 2},
    # the other two schedules: all forwards then all backwards; and torch's zero bubble, whose
    # backward splits into input gradients and, later, weight gradients that bypass the hooks
    "tp1_pp2_dp4_gpipe": {"tp": 1, "pp": 2, "pipeline_schedule": "gpipe"},
    "tp2_pp2_dp2_vpp2_zero_bubble": {"tp": 2, "pp": 2, "vpp": 2, "pipeline_schedule": "zero_bubble"},
    "tp2_pp2_dp2_zero1": {"tp": 2, "pp": 2, "use_distributed_optimizer": True},
    "tp1_pp1_dp8_zero1": {"tp": 1, "pp": 1, "use_distributed_optimizer": True},
    "tp2_pp2_dp2_vpp2_zero1": {"tp": 2, "pp": 2, "vpp": 2, "use_distributed_optimizer": True},
    # sequence parallelism and activation recompute (megallm.parallel.sequence_parallel, megallm.model.recompute)
    "tp2_pp2_dp2_sp": {"tp": 2, "pp": 2, "sequence_parallel": True},
    # tp 4 needs 4 key/value groups (tiny has 2): compared with a single process of that model
    "tp4_pp2_dp1_sp": {"tp": 4, "pp": 2, "sequence_parallel": True, "num_query_groups": 4},
    "tp2_pp2_dp2_full_recompute": {"tp": 2, "pp": 2, "recompute_granularity": "full", "recompute_method": "uniform",
                                   "recompute_num_layers": 1},
    "tp2_pp2_dp2_selective_recompute": {"tp": 2, "pp": 2, "recompute_granularity": "selective",
                                        "recompute_modules": ["layernorm", "swiglu", "mlp"]},
    # the 70B recipe's features together: sequence parallel norms' grads go through the main-grad buffers
    "tp2_pp2_dp2_vpp2_sp_recompute_zero1": {"tp": 2, "pp": 2, "vpp": 2, "sequence_parallel": True,
                                            "recompute_granularity": "full", "recompute_method": "block",
                                            "recompute_num_layers": 1, "use_distributed_optimizer": True},
    # Megatron's --overlap-grad-reduce / --overlap-param-gather over buckets of 20,000 elements
    # (several per chunk: a chunk of tiny at tp 2 pp 2 holds ~350,000)
    "tp2_pp2_dp2_zero1_overlap": {"tp": 2, "pp": 2, "use_distributed_optimizer": True, "ddp_bucket_size": 20000,
                                  "overlap_grad_reduce": True, "overlap_param_gather": True},
    "tp1_pp1_dp8_overlap": {"tp": 1, "pp": 1, "ddp_bucket_size": 20000, "overlap_grad_reduce": True},
}
COMMON = {"train_iters": 5, "lr_warmup_iters": 0, "eval_interval": 0, "save_interval": 0, "adam_eps": 1e-6, "lr": 1e-3,
          "min_lr": 1e-4}


# a layout that changes the model's shape is compared with a single process of the same shape
REFERENCES = {"reference": {"tp": 1, "pp": 1}, "reference_g4": {"tp": 1, "pp": 1, "num_query_groups": 4}}
# Evaluation every 2 iterations (one validation batch): training must not notice it
EVAL = {"eval_interval": 2, "eval_iters": 1}
EVALUATED = {"tp2_pp2_dp2_vpp2_eval": LAYOUTS["tp2_pp2_dp2_vpp2"] | EVAL}


def reference_for(layout: dict) -> str:
    return "reference_g4" if layout.get("num_query_groups") == 4 else "reference"


def scenario(name, tmp, layout):
    overrides = COMMON | layout | {"log_dir": str(tmp / name), "save": str(tmp / f"ckpt_{name}")}
    return {"name": name, "overrides": overrides, "save_final": True}


def weights(tmp, name, kind="model"):
    """Whole logical tensors of the final checkpoint, whatever layout wrote its pieces: the weights,
    or (kind "optim") Adam's moments as "<name>.exp_avg" and "<name>.exp_avg_sq"."""
    from megallm.checkpoint.load import PieceReader, read_meta

    ckpt = tmp / f"ckpt_{name}" / "iter_0000005"
    meta = read_meta(ckpt)
    pieces = PieceReader(ckpt, meta)
    states = ["param"] if kind == "model" else ["exp_avg", "exp_avg_sq"]
    return {(t if state == "param" else f"{t}.{state}"): pieces.read(t, (0,) * len(shape), tuple(shape), state)
            for t, shape in meta["tensors"].items() for state in states}


# bf16 against fp32 (see test_bf16_distributed_optimizer_tracks_fp32): 30 iterations, the
# weights checked against their masters and the masters against torch's AdamW at WATCH_STEP
BF16_ITERS, WATCH_STEP = 30, 3


def long_run(name, tmp, layout, **extra):
    return {"name": name, "overrides": COMMON | {"train_iters": BF16_ITERS, "log_dir": str(tmp / name)} | layout,
            **extra}


@pytest.fixture(scope="module")
def all_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("equivalence")
    ref = run_scenarios(1, tmp, [scenario(n, tmp, layout) for n, layout in REFERENCES.items()] + [
        scenario("reference_eval", tmp, {"tp": 1, "pp": 1} | EVAL),
        long_run("fp32_long", tmp, {}), long_run("fp32_long_perturbed", tmp, {}, perturb_weights=1e-6)], timeout=900)
    par = run_scenarios(8, tmp, [scenario(n, tmp, layout) for n, layout in (LAYOUTS | EVALUATED).items()] + [
        long_run("bf16_tp2_pp2_dp2_zero1", tmp, {"tp": 2, "pp": 2, "bf16": True, "use_distributed_optimizer": True},
                 watch_step=WATCH_STEP)], timeout=1500)
    return tmp, ref, par


@pytest.fixture(scope="module")
def runs(all_runs):
    return all_runs


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(runs, name):
    tmp, refs, par = runs
    ref_name = reference_for(LAYOUTS[name])
    ref, run = refs[ref_name], par[name]
    assert "error" not in run, run.get("error")
    if LAYOUTS[name].get("overlap_grad_reduce"):  # every bucket's reduction did start during backward
        assert all(launched == buckets > 1 for launched, buckets in run["buckets"]), run["buckets"]
    ref_losses = [r["loss"] for r in ref["records"]]
    losses = [r["loss"] for r in run["records"]]
    assert len(losses) == len(ref_losses) == 5
    for i, (a, b) in enumerate(zip(losses, ref_losses)):
        assert math.isclose(a, b, rel_tol=1e-5), f"iteration {i + 1}: {a} vs single-process {b}"
    assert [r["grad_norm"] for r in run["records"]] == pytest.approx([r["grad_norm"] for r in ref["records"]], rel=1e-4)
    ref_w, w = weights(tmp, ref_name), weights(tmp, name)
    assert ref_w.keys() == w.keys()
    worst = max((ref_w[k] - w[k]).abs().max().item() for k in ref_w)
    assert worst < 1e-5, f"largest weight difference {worst}"
    ref_m, m = weights(tmp, ref_name, "optim"), weights(tmp, name, "optim")
    assert ref_m.keys() == m.keys() and len(m) == 2 * len(w)
    for k in ref_m:
        scale = ref_m[k].abs().max().item()
        assert (ref_m[k] - m[k]).abs().max().item() <= 1e-3 * scale, k
    # the weights did move: an update that did nothing would pass the comparison trivially
    moved = max((ref_w[k] - weights_at_init(ref_w, k, REFERENCES[ref_name])).abs().max().item()
                for k in list(ref_w)[:3])
    assert moved > 1e-4


def test_evaluation_changes_no_bit(runs):
    """Evaluating between iterations under the interleaved schedule leaves training bit for bit as it
    was, and the validation loss equals the single process's (1e-5 relative). torch's schedule
    re-infers its stages' shapes on the first step after an eval() and calls loss_fn on that
    inference forward: per-document losses must see only the micro-batches' (an iteration whose
    loss rows and samples disagree is logged "unscored")."""
    tmp, refs, par = runs
    run, plain, ref = par["tp2_pp2_dp2_vpp2_eval"], par["tp2_pp2_dp2_vpp2"], refs["reference_eval"]
    assert "error" not in run, run.get("error")
    assert exact(run) == exact(plain)
    a, b = weights(tmp, "tp2_pp2_dp2_vpp2_eval"), weights(tmp, "tp2_pp2_dp2_vpp2")
    assert all(torch.equal(a[k], b[k]) for k in a)
    val = [(x["iteration"], x["val_loss"]) for x in run["records"] if "val_loss" in x]
    ref_val = [(x["iteration"], x["val_loss"]) for x in ref["records"] if "val_loss" in x]
    assert [i for i, _ in val] == [i for i, _ in ref_val] == [2, 4]
    for (i, v), (_, r) in zip(val, ref_val):
        assert math.isclose(v, r, rel_tol=1e-5), f"iteration {i}: validation loss {v} vs single-process {r}"
    logs = list((tmp / "tp2_pp2_dp2_vpp2_eval").glob("segment_losses-dp*.jsonl"))
    assert not any("unscored" in f.read_text() for f in logs), [f.read_text() for f in logs]


def exact(run) -> list[str]:
    """Each iteration's loss, grad norm and skip, for bit-for-bit comparisons (repr: the shortest
    string that round-trips, NaN included, as a skipped iteration's norm is)."""
    return [repr((r["loss"], r["grad_norm"], r["skipped"])) for r in run["records"]]


def weights_at_init(ref_w, key, overrides):
    from megallm.config import apply_overrides, load_yaml
    from megallm.model.weight_mapping import init_logical

    cfg = apply_overrides(load_yaml("configs/tiny.yaml"), overrides)
    return init_logical(cfg, key, tuple(ref_w[key].shape))


def relative_gaps(run, ref):
    losses, ref_losses = [r["loss"] for r in run["records"]], [r["loss"] for r in ref["records"]]
    assert len(losses) == len(ref_losses) == BF16_ITERS
    return [abs(a - b) / b for a, b in zip(losses, ref_losses)]


def test_bf16_distributed_optimizer_tracks_fp32(all_runs):
    """bf16 weights and activations with fp32 main grads, masters and moments (tp 2 pp 2 dp 2,
    distributed optimizer) against the fp32 single process, 30 iterations. The noise floor is an
    fp32 single-process run whose weights were moved by 1e-6 (N(0, 1) x 1e-6) at the start.
    Measured: largest relative loss gap over the 30 iterations 5.1e-4 (bf16) against a noise floor
    of 4.6e-5 (Adam amplifies a 1e-6 difference, see the module docstring); bf16 rounding of weights
    and activations (2^-9 relative) is what sets the gap."""
    _, ref, par = all_runs
    run = par["bf16_tp2_pp2_dp2_zero1"]
    assert "error" not in run, run.get("error")
    bf16_gap = max(relative_gaps(run, ref["fp32_long"]))
    noise = max(relative_gaps(ref["fp32_long_perturbed"], ref["fp32_long"]))
    print(f"bf16 loss gap {bf16_gap:.3g}, fp32 noise floor {noise:.3g}")
    assert 0 < noise < 2e-4
    assert noise < bf16_gap < 2e-3
    # the runs are not flat: the synthetic batches are random tokens, so the loss stays near
    # ln(4096) = 8.32, but it moves by 3e-2 from batch to batch, over 10x the bf16 gap
    losses = [r["loss"] for r in ref["fp32_long"]["records"]]
    assert max(losses) - min(losses) > 10 * bf16_gap


def test_bf16_masters_step_as_torch_adamw(all_runs):
    """At WATCH_STEP every rank's fp32 masters equal, bit for bit, torch's AdamW applied to the same
    fp32 masters, main grads and moments; and every bf16 weight is its master rounded (the share of
    the other data-parallel rank comes through the all-gather)."""
    _, _, par = all_runs
    watched = par["bf16_tp2_pp2_dp2_zero1"]["watched_step"]
    assert len(watched) == 8
    for rank, w in enumerate(watched):
        assert w["weights_dtype"] == "torch.bfloat16"
        assert w["masters_checked"] > 0, rank
        assert w["masters_bitwise"] and w["weights_are_rounded_masters"], (rank, w)


# --overlap-grad-reduce / --overlap-param-gather against the same buckets without overlap: bitwise the
# same run (one 4-rank launch, dp 2). The interleaved schedule with the distributed optimizer (both
# overlaps), and 1F1B with the all-reduce path. Rank 1 alone sees a NaN gradient at iteration 2, so
# every rank skips it: nothing of a skipped iteration's reductions may linger into the next one.
OVERLAPPED = {
    "pp2_vpp2_dp2_zero1": ({"pp": 2, "vpp": 2, "use_distributed_optimizer": True, "ddp_bucket_size": 20000},
                           {"overlap_grad_reduce": True, "overlap_param_gather": True}),
    "pp2_dp2_allreduce": ({"pp": 2, "ddp_bucket_size": 20000}, {"overlap_grad_reduce": True}),
}


# bf16 under the interleaved 1F1B and zero-bubble schedules (pp 2 vpp 2 dp 2, 3 iterations)
SCHEDULES_BF16 = {f"pp2_vpp2_dp2_bf16_{schedule}": {"pp": 2, "vpp": 2, "bf16": True, "train_iters": 3,
                                                    "pipeline_schedule": schedule}
                  for schedule in ("interleaved_1f1b", "zero_bubble")}


@pytest.fixture(scope="module")
def overlap_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("overlap")
    scenarios = [scenario(name + suffix, tmp, layout | extra) | {"env": {"MEGALLM_INJECT_NAN": "1:2"}}
                 for name, (layout, overlap) in OVERLAPPED.items()
                 for suffix, extra in (("", {}), ("_overlap", overlap))]
    scenarios += [scenario(name, tmp, layout) for name, layout in SCHEDULES_BF16.items()]
    # the first one's last checkpoint, loaded into other buckets and saved again (no iteration to run)
    layout, overlap = OVERLAPPED["pp2_vpp2_dp2_zero1"]
    scenarios.append(scenario("rebucketed", tmp, layout | overlap | {"ddp_bucket_size": 50000})
                     | {"load": str(tmp / "ckpt_pp2_vpp2_dp2_zero1")})
    return tmp, run_scenarios(4, tmp, scenarios, timeout=900)


@pytest.mark.parametrize("name", list(OVERLAPPED))
def test_overlap_changes_no_bit(overlap_runs, name):
    tmp, runs = overlap_runs
    plain, overlapped = runs[name], runs[name + "_overlap"]
    assert "error" not in plain and "error" not in overlapped, (plain.get("error"), overlapped.get("error"))
    assert all(launched == 0 for launched, _ in plain["buckets"])
    assert all(launched == buckets > 1 for launched, buckets in overlapped["buckets"]), overlapped["buckets"]
    assert [r["skipped"] for r in plain["records"]] == [False, True, False, False, False]
    assert exact(overlapped) == exact(plain)
    for kind in ("model", "optim"):
        a, b = weights(tmp, name, kind), weights(tmp, name + "_overlap", kind)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kind


def test_checkpoint_moves_between_bucket_sizes(overlap_runs):
    """Buckets change which ranges each rank owns, not what a checkpoint holds: loaded into buckets
    of another size and saved again, every weight and moment comes back bit for bit."""
    tmp, runs = overlap_runs
    assert runs["rebucketed"].get("loaded_iteration") == 5, runs["rebucketed"]
    for kind in ("model", "optim"):
        a, b = weights(tmp, "pp2_vpp2_dp2_zero1", kind), weights(tmp, "rebucketed", kind)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kind


def test_zero_bubble_sums_bf16_weight_gradients_in_fp32(overlap_runs):
    """The zero-bubble schedule computes weight gradients in a deferred pass that writes p.grad
    itself; each micro-batch's must still be summed into the fp32 main grad, so bf16 training under
    zero bubble is bit for bit training under interleaved 1F1B (summing the 8 micro-batches in bf16
    p.grad first, as torch alone does, changes the grad norm from the first iteration)."""
    tmp, runs = overlap_runs
    a, b = (runs[f"pp2_vpp2_dp2_bf16_{s}"] for s in ("interleaved_1f1b", "zero_bubble"))
    assert "error" not in a and "error" not in b, (a.get("error"), b.get("error"))
    assert len(a["records"]) == 3
    assert exact(b) == exact(a)
