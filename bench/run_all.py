#!/usr/bin/env python3
"""`make bench`: every CPU benchmark, side by side, written to bench/RESULTS.md.

    python bench/run_all.py [--quick] [--results bench/RESULTS.md] [--out-dir bench/out]

Sections: (1) megallm vs HuggingFace training throughput, (2) pipeline efficiency, (3) data
pipeline against the training loop's demand, (4) start-up of an 8-process launch, (5) the spike
detector's overhead, (6) the GPU figures of bench/gpu.py when bench/gpu_results.json holds a
run (else why there are none), beside published anchors, (7) `make preflight` on this node.
--quick shrinks every section to a smoke run (the tests use it); its RESULTS.md says so at the top.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import benchlib  # noqa: E402
from benchlib import median, table  # noqa: E402

from megallm.files import atomic_write  # noqa: E402

# Published anchors (docs/references.md#performance) and why a one-GPU bf16 slice is or is not comparable.
ANCHORS = [
    ("NeMo LLaMA2-70B, 64 H100, FP8, TP4 PP4 VP20", "759 TFLOP/s/GPU, 1707 tokens/s/GPU",
     "no: FP8 (2x bf16 peak), full 80-layer model, 64 GPUs with TP/PP communication"),
    ("Megatron (Narayanan et al. 2021), 3072 A100", "52% of peak (502 PFLOP/s)",
     "as MFU only: A100, bf16, 3072 GPUs, includes communication and bubbles"),
    ("Korthikanti et al. 2022, selective recompute + SP", "54.2% MFU", "as MFU only: A100, many GPUs"),
    ("MegaScale 2024, 175B on 12,288 GPUs", "55.2% MFU", "as MFU only: many GPUs"),
    ("LLaMA2 paper, 2T tokens on A100", "~323 tokens/s/GPU, ~46% MFU", "as MFU only: A100, 70B"),
    ("Dense bf16 GEMM 8192^3, healthy H100", "750-800 TFLOP/s", "yes: the practical ceiling of one H100"),
]


def fmt(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


# ------------------------------------------------------------------------------------------------
# Sections: each measures, then renders its markdown


def section_throughput(out: Path, quick: bool) -> tuple[dict, str]:
    import torch
    from train_vs_hf import compare

    torch.set_num_threads(1)  # the project's rule for CPU ranks (OMP_NUM_THREADS=1); same on both sides
    from megallm.config import apply_overrides, load_yaml

    cfg = apply_overrides(load_yaml(HERE.parent / "configs" / "tiny.yaml"),
                          {"tensorboard": False, "eval_interval": 0, "log_dir": str(out / "logs" / "train_vs_hf")})
    r = compare(cfg, iters=3 if quick else 30, warmup=1 if quick else 3)
    m = cfg.model
    ratio = r["megallm_tokens_per_s"] / r["hf_tokens_per_s"]
    rows = [
        ["megallm, tp 1 pp 1 (Trainer.train_step)", fmt(r["megallm_tokens_per_s"]),
         fmt(median(r["megallm_s"]) * 1e3), f"{r['first_loss']['megallm']:.6f}"],
        ["HF transformers LlamaForCausalLM + torch.optim.AdamW", fmt(r["hf_tokens_per_s"]),
         fmt(median(r["hf_s"]) * 1e3), f"{r['first_loss']['hf']:.6f}"],
    ]
    verdict = "met" if ratio >= 1.0 else "NOT met"
    text = "\n".join([
        "## 1. Training throughput: megallm against HuggingFace transformers",
        "",
        table(["implementation", "tokens/s (median)", "iteration ms (median)", "first-iteration loss"], rows),
        "",
        f"**megallm / HF = {ratio:.2f}x** (ratio of the medians). Per back-to-back pair, HF time / megallm "
        f"time: median {r['pair_ratio_median']:.2f}, p10 {r['pair_ratio_p10']:.2f}, p90 {r['pair_ratio_p90']:.2f}. "
        f"Target (megallm at least as fast): {verdict}.",
        "",
        f"How: configs/tiny.yaml ({m.num_layers} layers, hidden {m.hidden_size}, ffn {m.ffn_hidden_size}, "
        f"{m.num_attention_heads} heads / {m.num_query_groups} groups, vocab {m.vocab_size}), global batch "
        f"{cfg.training.global_batch_size} = {cfg.training.global_batch_size // cfg.training.micro_batch_size} "
        f"micro-batches of {cfg.training.micro_batch_size}, seq {cfg.training.seq_length}, fp32, one process, "
        f"{r['threads']} thread. Both sides: forward + backward of every micro-batch, clip at "
        f"{cfg.optimizer.clip_grad}, one AdamW step; the same batches through megallm's loader; HF loaded with "
        f"megallm's initial weights (the first losses above must agree). {r['iters']} alternating pairs "
        f"(megallm, HF, megallm, ...) after {r['warmup']} warm-up pairs; medians.",
    ])
    return r, text


def section_pipeline(out: Path, quick: bool) -> tuple[list, str]:
    import pipeline_bench

    iters, warmup, repeats = (1, 1, 1) if quick else (5, 2, 3)
    rows = pipeline_bench.measure(out / "pipeline", pps=(2,) if quick else (2, 4),
                                  micro_batches=(4,) if quick else (4, 8, 16), iters=iters, warmup=warmup,
                                  repeats=repeats)
    body = []
    for r in rows:
        bound = "cores" if r["core_floor_s"] > r["predicted_s"] else "bubble"
        body.append([r["pp"], r["schedule"], r["m"], f"{r['bubble']:.3f}", fmt(r["stage_max_s"] * 1e3),
                     fmt(r["predicted_s"] * 1e3), fmt(r["measured_s"] * 1e3), f"{r['efficiency']:.2f}",
                     fmt(r["core_floor_s"] * 1e3), bound, f"{r['efficiency_vs_bound']:.2f}"])
    cores = os.cpu_count()
    text = "\n".join([
        "## 2. Pipeline efficiency: measured against single-stage time x (1 + predicted bubble)",
        "",
        table(["pp", "schedule", "micro-batches m", "bubble (planner)", "T_stage ms", "predicted ms",
               "measured ms", "efficiency", f"core floor ms ({cores} cores)", "bound by", "efficiency vs bound"],
              body),
        "",
        "How: configs/tiny.yaml with 8 layers (pp 4 x v 2 needs a multiple of 8), tp 1, dp 1, micro batch 1, "
        "global batch m; one torchrun launch per pp (OMP_NUM_THREADS=1 per rank) running every schedule and m. "
        "measured: the pipeline step (forward + backward of the m micro-batches, no optimizer) from a barrier "
        f"before to a barrier after, median of {iters} iterations after {warmup} warm-up ones. T_stage: the busiest "
        "rank's chunks running forward + backward over the same m micro-batches ALONE, the other ranks asleep at "
        f"a barrier, so it has a core to itself (median of {repeats}, same launch). "
        "predicted = T_stage x (1 + bubble), "
        "bubble = (p-1)/(v m) from megallm.planner (the planner gives zero bubble the interleaved figure, so "
        "efficiency > 1 there is the schedule beating it). efficiency = predicted / measured. With p ranks on "
        f"{cores} cores the stages cannot all run at once: core floor = sum of the ranks' T_stage / {cores}; "
        "'efficiency vs bound' divides the larger of the two by the measurement. The last stage holds the "
        "output head (vocab 4096 x 128), which makes it the busiest by far at this size.",
    ])
    return rows, text


def section_data(out: Path, quick: bool, demand: dict) -> tuple[dict, str]:
    import bench_data

    data_out = out / "data"
    data_out.mkdir(parents=True, exist_ok=True)
    check_tokens = 20_000_000 if quick else 200_000_000
    check = bench_data.bench_check(data_out, check_tokens)
    workers = os.cpu_count() or 1
    mb_s, prefix, model = bench_data.bench_preprocess(data_out, workers)
    loader = bench_data.bench_loader(prefix, model, data_out)
    r = {"check_tokens_per_s": check, "check_tokens": check_tokens, "preprocess_mb_s": mb_s, "workers": workers,
         "prefix": prefix,
         "loader_tokens_per_s": loader, "demand": demand}
    rows = []
    for label, need in demand.items():
        rows.append([label, fmt(need), fmt(loader), f"{loader / need:,.0f}x"])
    text = "\n".join([
        "## 3. Data pipeline against the training loop's demand",
        "",
        table(["training loop (tokens/s one loader must feed)", "demand tokens/s", "loader tokens/s", "headroom"],
              rows),
        "",
        table(["data step", "throughput"], [
            ["preprocessing (demo corpus: Shakespeare jsonl, SentencePiece 4096)",
             f"{mb_s:.2f} MB/s ({workers} workers)"],
            [f"check_data scan ({check_tokens / 1e6:.0f}M tokens, page cache warm)", f"{check / 1e6:,.0f}M tokens/s"],
        ]),
        "",
        "How: bench/bench_data.py's functions. The loader reads megatron GPTDataset samples (seq 2048, micro "
        "batch 4, global 64, 50 global batches) through megallm's sampler in one process, the way each "
        "first/last-stage rank reads its data-parallel share; demand is the training loop's tokens/s divided by "
        "its data-parallel size (sections 1 and 4 of this run) and, for scale, NeMo's LLaMA2-70B figure "
        "(1707 tokens/s/GPU x 16 GPUs per replica at TP4 PP4). check_data: best of 3 scans; preprocessing: one run.",
    ])
    return r, text


def section_launch(out: Path, quick: bool) -> tuple[dict, str]:
    import launch_bench

    r = launch_bench.measure(out / "launch", nproc=8, iters=2 if quick else 15, warmup=1 if quick else 3)
    o = r["overrides"]
    layout = f"tp {o['tensor_model_parallel_size']} pp {o['pipeline_model_parallel_size']} dp 2"
    rows = [[p["part"], f"{p['median_s']:.2f}", f"{p['slowest_s']:.2f}"] for p in r["parts"]]
    startup = "\n".join([
        f"## 4. Start-up of an 8-process launch ({layout}, tiny config, gloo, {r['cores']} cores)",
        "",
        table(["part", "median over ranks, s", "slowest rank, s"], rows),
        "",
        "How: one `torchrun --nproc-per-node 8` of bench/launch_worker.py; each rank stamps wall-clock time at "
        "the end of each part, measured from the moment torchrun was called; Trainer.build's parts are timed "
        "inside it. Eight ranks share the cores, so imports (CPU-bound) run about 8/cores times slower than "
        f"alone. Whole launch (start-up + {2 * (r['iters'] + r['warmup'])} iterations + exit): "
        f"{r['launch_wall_s']:.1f} s.",
    ])
    return r, startup


def section_spike(launch: dict, single: dict) -> str:
    rows = []
    labels = {"as_is": "8 ranks, as the loop runs",
              "synced": "8 ranks, barrier before the check (control)"}
    for phase, label in labels.items():
        s = launch["spike"][phase]
        rows.append([label, f"{s['median']:.2%}", f"{s['p90']:.2%}", f"{s['max']:.2%}", f"{s['spike_ms_median']:.2f}",
                     fmt(s["elapsed_ms_median"]), s["samples"]])
    shares = single["spike_share"]
    rows.append(["1 rank, tp 1 pp 1 (section 1's run)", f"{median(shares):.2%}",
                 f"{benchlib.percentile(shares, 90):.2%}", f"{max(shares):.2%}", "-",
                 fmt(median(single["megallm_s"]) * 1e3), len(shares)])
    worst = launch["spike"]["as_is"]
    verdict = "met" if worst["median"] < 0.01 and worst["p90"] < 0.01 else (
        "met at the median, not at p90" if worst["median"] < 0.01 else "NOT met")
    return "\n".join([
        "## 5. Spike detector overhead (spike_check_ms / elapsed_ms per iteration)",
        "",
        table(["run", "median", "p90", "max", "check ms (median)", "iteration ms (median)", "samples"], rows),
        "",
        f"Target < 1% (tp 2 pp 2 dp 2, as the loop runs): {verdict}.",
        "",
        f"How: the same 8-process launch as section 4, {launch['iters']} iterations after {launch['warmup']} warm-up "
        "ones per phase, every rank's record counted (samples = ranks x iterations); spike_min_history 4 (tiny.yaml "
        "has 16), so the detector's z-scores are live in every timed iteration. spike_check_ms times the "
        "detector's statistics and decision. Its inputs come from collectives the loop runs anyway: the rank-local "
        "NaN/Inf flag rides as a second element in the grad norm's all-reduce and the loss's all-reduce and "
        "broadcast, so the detector adds no collective of its own (until c4a851e it ran one all-reduce, and two "
        "before that, which on 8 ranks sharing 2 cores cost 9-14 ms, about 1% at the median and 2% at p90). "
        "The second phase puts a barrier after the last collective, outside the timer, as a control.",
    ])


def section_preflight(out: Path, data_prefix: str, quick: bool) -> tuple[dict, str]:
    """`make preflight` as a user runs it on this node, timed from the shell, with a config that names
    real data files and a checkpoint dir so that the storage checks run too."""
    import subprocess

    import yaml

    pf = out / "preflight"
    pf.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load((HERE.parent / "configs" / "tiny.yaml").read_text())
    cfg["data"] = {"data_path": [data_prefix]}
    cfg["checkpoint"] = {**cfg.get("checkpoint", {}), "save": str(pf / "checkpoints")}
    (pf / "config.yaml").write_text(yaml.safe_dump(cfg))
    runs = []
    for k in range(1 if quick else 3):
        report = pf / f"preflight_{k}.json"
        started = time.perf_counter()
        preflight_args = f"PREFLIGHT_ARGS=--config {pf / 'config.yaml'} --json-out {report}"
        proc = subprocess.run(["make", "-s", "preflight", preflight_args],
                              cwd=HERE.parent, capture_output=True, text=True)
        wall = time.perf_counter() - started
        (pf / f"preflight_{k}.log").write_text(proc.stdout + proc.stderr)
        if not report.exists():
            raise RuntimeError(f"make preflight wrote no report (exit {proc.returncode}); "
                               f"see {pf / f'preflight_{k}.log'}")
        doc = json.loads(report.read_text())
        runs.append({"wall_s": wall, "exit": proc.returncode, "doc": doc})
    walls = [r["wall_s"] for r in runs]
    last = runs[-1]["doc"]
    status = {}
    for r in last["results"]:
        status[r["status"]] = status.get(r["status"], 0) + 1
    values = {r["check"]: r for r in last["results"] if r["value"] is not None}

    def shown(check):
        r = values.get(check)
        if not r:
            return "not run"
        why = f": {r['detail']}" if r["status"] != "PASS" and r["detail"] else ""
        return f"{r['value']:.3g} {r['unit']} ({r['status']}, threshold {r['threshold']}{why})"

    verdict = "met" if max(walls) < 30 else "NOT met"
    rows = [["`make preflight` wall time (torchrun start to exit)",
             f"median {median(walls):.1f} s, max {max(walls):.1f} s "
             f"over {len(walls)} runs (target < 30 s: {verdict})"],
            ["measurements inside the module", f"{last['measurements']['seconds']:.2f} s"],
            ["exit codes", ", ".join(str(r["exit"]) for r in runs)],
            ["checks (last run)", ", ".join(f"{n} {s}" for s, n in sorted(status.items()))]]
    rows += [[check, shown(check)] for check in
             ("compute.gemm", "allreduce.dp", "allreduce.world", "data.files", "data.read", "checkpoint",
              "host.memory")]
    text = "\n".join([
        f"## 7. `make preflight` on this node ({last['measurements']['nodes']['0']['nproc']} processes, profile "
        f"{last['measurements']['profile']['name']})",
        "",
        table(["", ""], rows),
        "",
        "How: `make -s preflight PREFLIGHT_ARGS=\"--config CFG --json-out J\"`, CFG being configs/tiny.yaml with "
        "section 3's preprocessed corpus as data and a checkpoint dir, so the storage checks (files, hashes, read "
        "throughput, free space) run. Multi-node behaviour is tested, not benchmarked: "
        "tests/test_preflight_netns.py runs three namespace nodes and catches each fault.",
    ])
    return {"walls_s": walls, "exits": [r["exit"] for r in runs], "last": last}, text


def section_gpu(results_json: Path) -> str:
    anchors = table(["published anchor (docs/references.md)", "figure", "comparable with one GPU, bf16, 2-4 layers?"],
                    ANCHORS)
    head = "## 6. GPU: a LLaMA2-70B slice on one GPU (bench/gpu.py)"
    if not results_json.exists():
        return "\n".join([
            head, "",
            "**Not run.** No GPU was lent to the sessions that built this (the device tool's status, last asked "
            "2026-12-03: not drawn), so there are no GPU figures here and none are estimated. `make gpu-check` "
            "runs the check on one GPU in under 10 minutes and writes bench/gpu_results.json, which this section "
            "then renders; its CPU twin `python bench/gpu.py --smoke` runs in the test suite. apex and "
            "transformer-engine are used when importable; without them megallm's own RMSNorm runs.",
            "", anchors])
    report = json.loads(results_json.read_text())
    sys.path.insert(0, str(HERE))
    from gpu import render

    d = report["device"]
    return "\n".join([
        head, "",
        f"Device: {d.get('name')} ({d.get('memory_gib')} GiB, CUDA {d.get('cuda')}, NCCL {d.get('nccl')}), "
        f"torch {d.get('torch')}, transformers {d.get('transformers')}, megatron-core {d.get('megatron_core')}; "
        f"date {report['date']}. Peak: {report['peak_flops'] / 1e12 if report['peak_flops'] else '-'} TFLOP/s dense "
        f"bf16 ({report['peak_source']}); measured 8192^3 bf16 GEMM: {_tflops(report.get('gemm_8192_tflops'))}.",
        "", render(report), "",
        f"How: {report['config']['model']['num_layers']} layers of the 70B shape, seq "
        f"{report['config']['training']['seq_length']}, {report['tokens_per_iteration']} tokens per iteration, "
        f"{report['model_flops_per_token'] / 1e9:.2f} GFLOP/token (6N + 12Lhs), {report['iters']} timed iterations "
        f"after {report['warmup']} warm-up per variant; medians.", "", anchors])


def _tflops(value) -> str:
    return "-" if value is None else f"{value:.0f} TFLOP/s"


# ------------------------------------------------------------------------------------------------


def header(started: float, load_start: tuple, quick: bool) -> str:
    m = benchlib.machine()
    load_end = os.getloadavg()
    lines = ["# megallm benchmarks", ""]
    if quick:
        lines += ["**--quick smoke run: too few repeats to quote.**", ""]
    lines += [
        table(["", ""], [
            ["date", str(date.today())],
            ["commit", benchlib.git_commit()],
            ["machine", f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']}"],
            ["software", f"python {m['python']}, torch {m['torch']}, megatron-core {m['megatron-core']}, "
                         f"transformers {m['transformers']}"],
            ["load average (1 min) at start / end", f"{load_start[0]:.1f} / {load_end[0]:.1f} "
                                                    "(other processes on this machine compete for its cores)"],
            ["`make bench` wall time", f"{time.time() - started:.0f} s"],
        ]),
        "",
        "Each ratio is taken side by side in one run (same process or same launch). Regenerate: `make bench`.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: minimal repeats")
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--out-dir", default=str(HERE / "out"))
    parser.add_argument("--gpu-results", default=str(HERE / "gpu_results.json"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    started, load_start = time.time(), os.getloadavg()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(f"[{time.time() - started:6.0f} s] {msg}", flush=True)

    log("section 1: megallm vs HF")
    single, s1 = section_throughput(out, args.quick)
    log("section 2: pipeline efficiency")
    _, s2 = section_pipeline(out, args.quick)
    log("sections 4 and 5: 8-process launch (start-up, spike detector)")
    launch, s4 = section_launch(out, args.quick)
    log("section 3: data")
    demand = {
        "tiny, 1 process (section 1)": single["megallm_tokens_per_s"],
        "tiny, 8 processes tp 2 pp 2 dp 2 (section 4), per data-parallel rank":
            launch["spike"]["as_is"]["tokens_per_s"] / 2,
        "LLaMA2-70B on H100 (NeMo: 1707 tokens/s/GPU x 16 GPUs per replica)": 1707 * 16,
    }
    data, s3 = section_data(out, args.quick, demand)
    log("section 7: make preflight")
    preflight, s7 = section_preflight(out, data["prefix"], args.quick)
    s5 = section_spike(launch, single)
    s6 = section_gpu(Path(args.gpu_results))
    text = "\n\n".join([header(started, load_start, args.quick), s1, s2, s3, s4, s5, s6, s7]) + "\n"
    results = atomic_write(args.results, text)
    summary = {"throughput": single, "launch": launch, "data": data, "preflight": preflight}
    (out / "results.json").write_text(json.dumps(summary, default=str))
    log(f"wrote {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
