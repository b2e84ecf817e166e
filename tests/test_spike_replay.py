"""A real run of the tiny model (one process, Shakespeare with planted junk batches, --spike-action
skip) and its logs: the report agrees with the detector's decisions on every spike, with and without
spikes.jsonl, and `spike_report.py --replay` reproduces the run's decisions with the run's detector
and shows another detector's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from data_helpers import VOCAB, corpus, data_dir, tokenizer_model, two_datasets  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
GBS, ITERS, JUNK = 2, 90, [40, 41, 70]


@pytest.fixture(scope="module")
def run(single_rank, two_datasets, tokenizer_model, tmp_path_factory):  # noqa: F811
    from megallm.config import apply_overrides, load_yaml
    from megallm.training.loop import Trainer

    tmp = tmp_path_factory.mktemp("replay")
    cfg = apply_overrides(load_yaml(REPO / "configs" / "tiny.yaml"), {
        "data_path": [two_datasets[0]], "tokenizer_model": str(tokenizer_model), "vocab_size": VOCAB,
        "seq_length": 64, "data_cache_path": str(tmp / "cache"), "global_batch_size": GBS, "micro_batch_size": GBS,
        "train_iters": ITERS, "eval_interval": 0, "log_dir": str(tmp / "log"), "tensorboard": False,
        "save_interval": 0, "log_interval": 1000, "spike_action": "skip"})
    os.environ["MEGALLM_PLANT_JUNK"] = ",".join(f"{(i - 1) * GBS}-{i * GBS}" for i in JUNK)
    try:
        tr = Trainer.build(cfg, 1)
        records = []
        tr.callbacks.append(lambda _, record: records.append(record))
        tr.train()
        tr.logger.close()
    finally:
        os.environ.pop("MEGALLM_PLANT_JUNK")
    flagged = {r["iteration"]: r for r in records if r["skip_reason"]}
    return tmp / "log", flagged


def test_the_run_skips_the_junk(run):
    _, flagged = run
    assert set(JUNK) <= set(flagged)
    assert len(flagged) <= len(JUNK) + 2  # at most two false skips in 90 iterations


def test_report_agrees_with_the_detector_on_every_spike(run, tmp_path):
    import shutil

    from megallm.report import build_report

    log_dir, flagged = run
    for keep_spikes_file in (True, False):
        target = tmp_path / f"log_{keep_spikes_file}"
        shutil.copytree(log_dir, target)
        if not keep_spikes_file:
            (target / "spikes.jsonl").unlink()
        report = build_report(target)
        spikes = {s["iteration"]: s for s in report["spikes"]}
        assert spikes.keys() == flagged.keys(), keep_spikes_file
        for it, record in flagged.items():
            s = spikes[it]
            assert s["reason"] == record["skip_reason"] and s["action"] == "skip"
            assert s["loss_zscore"] == record["loss_zscore"] and s["grad_zscore"] == record["grad_zscore"]
            assert s["derived"] == (not keep_spikes_file)
        if not keep_spikes_file:  # the derived window statistics are the detector's own
            logged = {json.loads(line)["iteration"]: json.loads(line)
                      for line in (log_dir / "spikes.jsonl").read_text().splitlines()}
            for it, s in spikes.items():
                assert s["loss_mean"] == pytest.approx(logged[it]["loss_mean"], rel=1e-12)
                assert s["loss_std"] == pytest.approx(logged[it]["loss_std"], rel=1e-12)


def test_replay_cli(run):
    log_dir, flagged = run
    its = ", ".join(str(i) for i in sorted(flagged))

    def replay(*flags):
        proc = subprocess.run([sys.executable, "tools/spike_report.py", str(log_dir), "--replay", *flags],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    same = replay()  # the run's own detector over its own metrics: the same decisions
    assert f"the run flagged {len(flagged)}: {its}" in same and f"the replay flags {len(flagged)}: {its}" in same
    assert "only by the run none; only by the replay none" in same
    lenient = replay("--spike-method", "mad", "--spike-zscore", "1000", "--spike-grad-zscore", "1000")
    assert "the replay flags 0: none" in lenient and "spike_method=mad" in lenient
    bad = subprocess.run([sys.executable, "tools/spike_report.py", str(log_dir), "--replay", "--spike-method",
                          "median"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "invalid choice: 'median'" in bad.stderr
