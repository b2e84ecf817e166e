"""The benchmarks' arithmetic and plumbing: statistics, the pipeline model, start-up parts, the
FLOP count of the GPU slice, and that megallm and HF run the same model side by side."""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import benchlib  # noqa: E402
import launch_bench  # noqa: E402
import pipeline_bench  # noqa: E402


def test_statistics_and_table():
    assert benchlib.median([3.0, 1.0, 2.0, 100.0]) == 2.5
    assert benchlib.percentile(range(11), 90) == pytest.approx(9.0)
    assert benchlib.spread([1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert benchlib.table(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |"


def test_pipeline_analysis_uses_the_busiest_stage_and_the_core_floor():
    # two ranks; rank 1 (the head) is busiest: predicted = 0.3 * (1 + 0.25) = 0.375
    result = {"ranks": [{"pipeline_s": [0.50, 0.40, 0.45], "stage_s": 0.1, "iteration_s": [0.6]},
                        {"pipeline_s": [0.49, 0.41, 0.44], "stage_s": 0.3, "iteration_s": [0.6]}]}
    r = pipeline_bench.analyse(result, bubble=0.25, cores=2)
    assert r["measured_s"] == pytest.approx(0.45)  # median over iterations of the slowest rank
    assert r["predicted_s"] == pytest.approx(0.375)
    assert r["efficiency"] == pytest.approx(0.375 / 0.45)
    assert r["core_floor_s"] == pytest.approx(0.2)
    # four ranks on one core: the floor (sum of stages) binds, not the bubble
    four = {"ranks": [{"pipeline_s": [2.0], "stage_s": 0.5, "iteration_s": [2.0]}] * 4}
    r = pipeline_bench.analyse(four, bubble=0.75, cores=1)
    assert r["core_floor_s"] == pytest.approx(2.0) and r["bound"] == pytest.approx(2.0)
    assert r["efficiency_vs_bound"] == pytest.approx(1.0)


def test_pipeline_scenarios_and_planner_bubble():
    scs = pipeline_bench.scenarios(4, (4, 8))
    assert len(scs) == 6 and len({s["name"] for s in scs}) == 6
    interleaved = next(s for s in scs if s["overrides"]["pipeline_schedule"] == "interleaved_1f1b"
                       and s["overrides"]["global_batch_size"] == 8)
    bubble = pipeline_bench.predicted_bubble(str(ROOT / "configs/tiny.yaml"), interleaved["overrides"], 4)
    assert bubble == pytest.approx(3 / (2 * 8))  # (p - 1) / (v m)
    one_f_one_b = scs[0]["overrides"]
    assert pipeline_bench.predicted_bubble(str(ROOT / "configs/tiny.yaml"), one_f_one_b, 4) == pytest.approx(3 / 4)


def _rank(offset: float, spike_ms: float, elapsed_ms: float) -> dict:
    names = ["launch"] + [mark for mark, _ in launch_bench.PARTS]
    marks = {name: 100.0 + i + offset for i, name in enumerate(names)}
    records = [{"spike_check_ms": spike_ms, "elapsed_ms": elapsed_ms, "tokens_per_sec": 1000.0}] * 2
    return {"marks": marks, "build": {"model_chunks": 0.5}, "spike": {"as_is": records, "synced": records}}


def test_startup_parts_and_spike_share():
    ranks = [_rank(0.0, 1.0, 100.0), _rank(0.5, 3.0, 100.0)]
    ranks[1]["marks"]["launch"] = 100.0  # all ranks share the launch moment
    parts = launch_bench.startup_parts(ranks)
    first = parts[0]
    assert first["median_s"] == pytest.approx(1.25) and first["slowest_s"] == pytest.approx(1.5)
    assert all(p["median_s"] == pytest.approx(1.0) for p in parts[1:len(launch_bench.PARTS)])
    assert parts[-1]["part"] == "launch to end of first iteration" and parts[-1]["slowest_s"] == pytest.approx(7.5)
    share = launch_bench.spike_overhead(ranks, "as_is")
    assert share["samples"] == 4 and share["median"] == pytest.approx(0.02) and share["max"] == pytest.approx(0.03)


def test_gpu_slice_flops_are_6n_plus_attention():
    import gpu

    from megallm.planner.throughput import model_flops_per_token

    cfg = gpu.slice_config(layers=2, global_batch=8)
    h, f, kv, v, s = 8192, 28672, 1024, 32000, 4096
    layer = h * (h + 2 * kv) + h * h + 3 * h * f + 2 * h
    n = 2 * layer + v * h + h  # layers, output head, final norm; the input embedding is a lookup
    assert model_flops_per_token(cfg) == 6 * n + 12 * 2 * h * s
    assert cfg.model.num_attention_heads == 64 and cfg.model.num_query_groups == 8


def test_megallm_and_hf_run_the_same_model(single_rank, tmp_path):
    """The HF side, given megallm's initial weights, computes the same loss on the same batch,
    and one timed iteration of each side runs."""
    import torch
    from side_by_side import HFTrainer, hf_state_dict, timed

    from megallm.config import apply_overrides, load_yaml
    from megallm.training.loop import Trainer

    cfg = apply_overrides(load_yaml(ROOT / "configs/tiny.yaml"), {
        "tensorboard": False, "log_dir": str(tmp_path), "eval_interval": 0, "global_batch_size": 4, "num_layers": 2})
    tr = Trainer.build(cfg, 1)
    hf = HFTrainer(cfg, torch.device("cpu"), state_dict=hf_state_dict(tr.chunks[0], cfg))
    tokens, labels = tr.local_batch(tr.train_ds, 0)
    record, seconds = timed(tr.train_step, tr.device)
    loss_hf, _ = timed(lambda: hf.step(tokens, labels), tr.device)
    assert seconds > 0
    assert loss_hf == pytest.approx(record["loss"], abs=1e-5)
    assert math.log(cfg.model.vocab_size) - 0.5 < loss_hf < math.log(cfg.model.vocab_size) + 0.5
    tr.logger.close()


def test_gpu_script_runs_on_cpu(single_rank, tmp_path):
    """`make gpu-check`'s script in --smoke mode: every part runs on the CPU at configs/tiny.yaml's
    shape and reports real numbers (the GPU path is the same code at the 70B shapes)."""
    import gpu
    import torch

    if not torch.cuda.is_available():  # without --smoke there is nothing to run here, and it says so
        assert gpu.main(["--json-out", str(tmp_path / "refused.json")]) == 2
        assert not (tmp_path / "refused.json").exists()
    out = tmp_path / "gpu.json"
    argv = ["--smoke", "--iters", "2", "--warmup", "1", "--variants", "megallm,hf", "--json-out", str(out)]
    assert gpu.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["smoke"] and report["tokens_per_iteration"] == 8 * 128  # --global-batch 8 micro-batches of seq 128
    assert report["config"]["training"]["bf16"] and report["config"]["model"]["num_layers"] == 2

    # 1. versions and kernels
    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["megatron_core"]
    assert report["kernels"]["rms_norm"] == "megallm.model.norm.RMSNorm" and not report["kernels"]["fused_rms_norm"]

    # 2. SDPA: tiny's 8 heads / 2 groups at tp 1 and 4 / 1 at tp 2, micro batch 1 and 2; the default
    # dispatch is one of the backends that also run alone (the CPU has MATH and its FLASH_ATTENTION kernel).
    shapes = [(r["tp"], r["heads"], r["groups"], r["micro_batch"]) for r in report["sdpa"]]
    assert shapes == [(1, 8, 2, 1), (1, 8, 2, 2), (2, 4, 1, 1), (2, 4, 1, 2)]
    for r in report["sdpa"]:
        assert r["backends"]["MATH"]["ok"] and r["backends"]["MATH"]["ms"] > 0
        assert r["backends"][r["default"]]["ok"], r
        assert any("scaled_dot_product" in op for op in r["default_ops"])

    # 3. saved activations of one layer against the planner. Measured on the CPU (torch 2.13, bf16
    # and fp32 alike): equal to the byte in all four modes, so the tolerance is float rounding only.
    acts = {r["mode"]: r for r in report["activations"]}
    assert list(acts) == list(gpu.RECOMPUTE_MODES)
    for r in acts.values():
        assert r["saved_bytes"] > 0 and r["ratio"] == pytest.approx(1.0, abs=1e-9), r
    per_token = [r["bytes_per_token"] for r in acts.values()]
    assert per_token == sorted(per_token, reverse=True)  # each recompute mode keeps less than the one before
    assert acts["full (uniform, 1 layer)"]["bytes_per_token"] == 128 * 2  # the layer input: h bf16 values
    assert acts["none"]["sdpa"] == report["sdpa"][0]["default"]  # the real layer dispatches as the probe says

    # 4. training: finite, falling losses on both sides; throughput; the planner beside it
    names = [v["name"] for v in report["variants"]]
    assert names == ["megallm", "hf"]
    for v in report["variants"]:
        assert v["tflops"] > 0 and v["mfu"] is None  # no peak on the CPU
        assert v["tokens_per_s"] == pytest.approx(report["tokens_per_iteration"] / v["median_s"])
        assert len(v["losses"]) == 3 and v["loss_finite"] and v["loss_falling"], v["losses"]
    assert report["variants"][0]["dtype"] == "bfloat16"
    assert report["side_by_side"]["megallm_over_hf"] > 0
    assert report["plan"]["model_state_bytes"] > 0 and report["plan"]["activation_bytes"] > 0
    text = gpu.render(report)
    assert "| megallm | unfused |" in text and "| none | 4,840.0 | 4,840.0 | 1.0000 |" in text


@pytest.mark.slow
def test_pipeline_and_launch_benchmarks_run(tmp_path):
    rows = pipeline_bench.measure(tmp_path / "pipe", pps=(2,), micro_batches=(4,), iters=1, warmup=1, repeats=1,
                                  schedules=pipeline_bench.SCHEDULES[:1])
    (row,) = rows
    assert row["pp"] == 2 and row["m"] == 4 and row["bubble"] == pytest.approx(0.25)
    assert row["measured_s"] > 0 and len(row["stage_s"]) == 2 and min(row["stage_s"]) > 0
    assert row["predicted_s"] == pytest.approx(max(row["stage_s"]) * 1.25)

    r = launch_bench.measure(tmp_path / "launch", nproc=4, iters=1, warmup=0)
    assert r["nproc"] == 4 and r["launch_wall_s"] > 0
    assert all(p["median_s"] >= 0 for p in r["parts"])
    for phase in ("as_is", "synced"):
        assert r["spike"][phase]["samples"] == 4 and 0 < r["spike"][phase]["median"] < 1
