"""Planted junk: blocks of uniformly random token ids at known positions of the data stream of a
real corpus, trained on for 300 iterations under tp 2 x pp 2 x dp 2. Exactly the iterations whose
batch holds a junk block are skipped, on every rank alike, and spikes.jsonl names the samples.

Why the blocks are planted in the stream (the MEGALLM_PLANT_JUNK hook) and not as documents in the
corpus: megatron's GPTDataset shuffles samples, so a junk document lands as one sample among 16 in
a batch, which moves this tiny model's batch loss by ~0.16 while the loss itself falls by more than
that over the window. Measured with 24 planted junk documents: loss z-scores of -1.5..-0.7 and
grad-norm z-scores up to 1.1 at the junk iterations, against up to 3.2 at clean ones; no detector
of this kind can tell them apart, and at scale a lone bad sample is no spike either. A bad block
that fills the batch (duplicated junk, a broken shard) is what spikes, and that is what is planted.
"""

import json
from pathlib import Path

import pytest

from tests.launch import ROOT, run_scenarios

pytestmark = pytest.mark.slow

ITERS, GBS = 300, 16
JUNK_ITERATIONS = [70, 71, 140, 205, 260]  # two adjacent: a burst must not mask its second spike


def stream_range(iteration: int) -> tuple[int, int]:
    return (iteration - 1) * GBS, iteration * GBS


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from megallm.data.corpus import prepare_demo_data

    tmp = tmp_path_factory.mktemp("planted")
    clean, tokenizer = prepare_demo_data(ROOT / "data_cache", vocab_size=4096, workers=2)
    overrides = {"tp": 2, "pp": 2, "train_iters": ITERS, "data_path": [clean], "tokenizer_model": str(tokenizer),
                 "data_cache_path": str(tmp / "cache"), "eval_interval": 0, "log_dir": str(tmp / "log")}
    plant = ",".join(f"{a:d}-{b:d}" for a, b in map(stream_range, JUNK_ITERATIONS))
    runs = run_scenarios(8, tmp, [{"name": "planted", "overrides": overrides,
                                   "env": {"MEGALLM_PLANT_JUNK": plant}}], timeout=1800)
    return tmp, runs["planted"]


def test_exactly_the_junk_iterations_are_skipped_on_every_rank(planted):
    tmp, run = planted
    assert "error" not in run, run.get("error")
    skipped = [r["iteration"] for r in run["records"] if r["skipped"]]
    assert skipped == JUNK_ITERATIONS
    assert all(ranks_skips == JUNK_ITERATIONS for ranks_skips in run["skipped_per_rank"])
    by_it = {r["iteration"]: r for r in run["records"]}
    for it in JUNK_ITERATIONS:
        assert by_it[it]["skip_reason"] in ("loss_zscore", "grad_zscore"), by_it[it]
    losses = [r["loss"] for r in run["records"]]
    assert min(losses[-20:]) < losses[0] - 1.5  # and the model trained through them


def test_spike_records_name_the_junk_samples(planted):
    tmp, _ = planted
    spikes = [json.loads(line) for line in (tmp / "log" / "spikes.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in spikes] == JUNK_ITERATIONS
    for s in spikes:
        a, b = stream_range(s["iteration"])
        assert s["samples"] == list(range(a, b))
        assert s["loss_zscore"] > 6 or s["grad_zscore"] > 6
        # the corpus' provenance of each sample: source file and line of its documents
        assert [d["sample"] for d in s["documents"]] == s["samples"]
        assert all(src.startswith("shakespeare.jsonl:") or ".jsonl:" in src
                   for d in s["documents"] for src in d["sources"])


def test_spike_report_explains_the_run(planted):
    from megallm.report import build_report, write_outputs, write_skip_list

    tmp, _ = planted
    report = build_report(tmp / "log")
    assert report["summary"]["skipped_iterations"] == len(JUNK_ITERATIONS)
    paths = write_outputs(report, tmp / "report")
    assert Path(paths["html"]).stat().st_size > 10_000 and Path(paths["png"]).exists()
    skip = write_skip_list(report, tmp / "skip.txt")
    assert skip["samples"] == len(JUNK_ITERATIONS) * GBS
    listed = [int(line) for line in (tmp / "skip.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert listed == [s for it in JUNK_ITERATIONS for s in range(*stream_range(it))]
