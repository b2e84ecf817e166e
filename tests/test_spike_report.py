"""tools/spike_report.py and megallm.report on runs written to the log contract
(tests/spike_report_logs.py): the full JSON logs with a truncated last line, logs missing
spikes.jsonl with a corrupt middle line, and TensorBoard-only logs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import spike_report_logs as logs

from megallm.config import Config, apply_overrides, load_yaml
from megallm.report import ReportError, advice, analysis, build_report, plot, write_outputs, write_skip_list

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("run") / "logs"
    sim = logs.write_run(log_dir)
    return log_dir, sim, build_report(log_dir)


def _spike(report, iteration):
    return next(s for s in report["spikes"] if s["iteration"] == iteration)


def test_summary_counts_the_planted_events(run):
    _, sim, report = run
    s = report["summary"]
    assert s["spikes"] == 5
    assert s["spikes_by_action"] == {"skip": 3, "rollback": 1, "warn": 1}
    assert s["spikes_by_reason"] == {"loss_zscore": 3, "nonfinite_loss": 1, "grad_zscore": 1}
    # 180 executed steps were logged; the kill cut the last line, so 179 are read.
    assert len(sim["metrics"]) == 180 and s["steps_executed"] == 179
    assert (s["first_iteration"], s["last_iteration"]) == (1, 159)
    assert s["replayed_steps"] == 20  # iterations 81..100 ran twice
    assert s["skipped_iterations"] == 4  # 40, 60, 75 skipped; 100 rolled back
    assert s["skipped_tokens"] == 4 * 16 * 128 and s["total_tokens"] == 179 * 16 * 128
    assert s["skipped_token_share"] == pytest.approx(4 / 179)
    assert s["truncated"] and any("metrics.jsonl:180: last line truncated" in n for n in report["notes"])
    last_val = [m["val_loss"] for m in sim["metrics"] if "val_loss" in m][-1]  # iteration 150
    assert s["final_val_loss"] == pytest.approx(last_val)


def test_rollback_recovery_and_zscores(run):
    _, sim, report = run
    [rb] = report["rollbacks"]
    assert (rb["iteration"], rb["to_iteration"], rb["spike_iterations"]) == (100, 80, [100])
    assert rb["skipped_samples"] == 20 * 16  # data resumed past the 20 batches since the checkpoint
    # Spike 40: the loss stayed 4 sigma high for 2 steps (above the 2-sigma recovery line), back at 43.
    s40 = _spike(report, 40)
    assert s40["recovery_iters"] == 3 and s40["recovered_at"] == 43
    assert s40["recovery_threshold"] == pytest.approx(s40["loss_mean"] + 2 * s40["loss_std"])
    assert _spike(report, 75)["recovery_iters"] == 1
    # After the rollback the next executed step is the replayed iteration 81, already normal.
    assert _spike(report, 100)["recovery_iters"] == 1 and _spike(report, 100)["recovered_at"] == 81
    # The largest loss z of the run is a junk spike's (in log-loss z the same +3 on a lower loss is a larger ratio).
    top_sim = max((x for x in sim["spikes"] if x["loss_zscore"] is not None), key=lambda x: x["loss_zscore"])
    top_loss_z = report["largest_zscores"]["loss_zscore"][0]
    assert top_loss_z["iteration"] == top_sim["iteration"] and top_sim["iteration"] in logs.JUNK_ITERATIONS
    assert top_loss_z["zscore"] == pytest.approx(top_sim["loss_zscore"]) and top_loss_z["zscore"] > 20
    # Most severe first: the NaN ranks above every z-score.
    order = [report["spikes"][i]["iteration"] for i in report["top"]]
    assert order[0] == 60 and math.isinf(_spike(report, 60)["severity"])


def test_same_documents_found_and_advised(run):
    _, _, report = run
    [junk] = report["clustering"]["documents"]["repeated_documents"]
    assert (junk["dataset"], junk["document"], junk["source"]) == ("data/junk", 7, "junk.jsonl:7")
    assert junk["spikes"] == 3 and junk["iterations"] == [40, 75, 100]
    assert _spike(report, 75)["repeated_documents"] == ["junk.jsonl:7 (in 3 spikes)"]
    rules = {a["rule"]: a for a in report["advice"]}
    assert "appear in 3 spikes" in rules["repeated_documents"]["message"]
    assert "40, 75, 100" in rules["repeated_documents"]["evidence"]
    assert "junk.jsonl:7 (3 samples)" in rules["repeated_documents"]["evidence"]
    assert "60" in rules["nonfinite"]["evidence"]
    # The fixture's optimizer is LLaMA2's except lr: 3e-3 on a 1.8M-parameter model is above 3x the
    # largest published lr (6e-4, GPT-3 125M).
    assert set(rules) == {"repeated_documents", "nonfinite", "lr"}
    assert "lr=0.003 > 0.0018" in rules["lr"]["evidence"]


def test_advice_rules_fire_on_their_thresholds():
    def rules(**settings):
        cfg = load_yaml(REPO / "configs" / "llama2_70b.yaml")
        for section, values in settings.items():
            for k, v in values.items():
                setattr(getattr(cfg, section), k, v)
        spikes = [{"iteration": 12, "reason": "loss_zscore"}]
        return {a["rule"]: a["evidence"] for a in advice.advise(cfg, spikes, [], "config.yaml")}

    assert rules() == {}  # the LLaMA2-70B recipe is clean
    out = rules(optimizer={"adam_beta2": 0.999, "adam_eps": 1e-5, "weight_decay": 0.01,
                           "lr_warmup_fraction": None, "lr_warmup_iters": 0},
                model={"hidden_dropout": 0.1})
    assert set(out) == {"adam_beta2", "adam_eps", "weight_decay", "dropout", "warmup"}
    assert "adam_beta2=0.999" in out["adam_beta2"] and "iterations 12" in out["adam_beta2"]
    assert "no warmup" in out["warmup"]
    assert rules(optimizer={"adam_beta2": 0.96}).keys() == {"adam_beta2"}  # > 0.95, as the lint says
    assert rules(optimizer={"adam_eps": 1e-6}).keys() == {"adam_eps"}  # eps >= 1e-6
    assert rules(optimizer={"weight_decay": 0.05}).keys() == {"weight_decay"}
    short = rules(optimizer={"lr_warmup_fraction": None, "lr_warmup_iters": 5}, training={"train_iters": 1000})
    assert "5 iterations is under 1%" in short["warmup"]
    # lr: 3x the largest published lr for a model this size or larger (70B: 1.5e-4, so 4.5e-4)
    assert "lr" not in rules(optimizer={"lr": 4.5e-4})
    assert "lr=0.00046 > 0.00045" in rules(optimizer={"lr": 4.6e-4})["lr"]


def test_lint_and_advice_read_one_rules_table():
    """Every config the launcher warns about, the report advises on, with the same evidence, and
    the demo's tiny model at its own lr gets no lr advice (the old batch-size rule said 6.6e-6)."""
    from megallm.config import lint_hyperparameters
    from megallm.training.hyperparams import RULES, violations

    tiny = load_yaml(REPO / "configs" / "tiny.yaml")
    assert lint_hyperparameters(tiny) == [] and advice.advise(tiny, [], [], "config.yaml") == []
    cases = [{"adam_beta2": 0.96}, {"adam_beta2": 0.999}, {"adam_eps": 1e-6}, {"weight_decay": 0.05},
             {"lr": 1e-2}, {"lr_warmup_iters": 0}, {"lr_warmup_iters": 1, "train_iters": 1000},
             {"hidden_dropout": 0.1}, {"adam_beta2": 0.95, "lr": 1.8e-3}]
    fired = set()
    for overrides in cases:
        cfg = apply_overrides(load_yaml(REPO / "configs" / "tiny.yaml"), overrides)
        lint = lint_hyperparameters(cfg)
        advised = {a["rule"]: a["evidence"] for a in advice.advise(cfg, [], [], "config.yaml")}
        found = violations(cfg)
        assert len(lint) == len(advised) == len(found), (overrides, lint, advised)
        for (rule, evidence), line in zip(found, lint):
            assert line.startswith(evidence) and advised[rule.name].startswith(evidence)
            fired.add(rule.name)
    assert fired == {r.name for r in RULES}


def test_synthetic_data_has_no_provenance():
    """Synthetic data logs one entry per sample with no documents; that must not count as provenance."""
    spikes = [{"iteration": it, "samples": [it, 99],
               "documents": [{"sample": it, "dataset": "synthetic", "documents": [], "sources": []},
                             {"sample": 99, "dataset": "synthetic", "documents": [], "sources": []}]}
              for it in (3, 8)]
    d = analysis.document_clustering(spikes)
    assert d["spikes_with_documents"] == 0 and d["repeated_documents"] == []
    assert d["repeated_samples"] == [{"sample": 99, "spikes": 2, "iterations": [3, 8]}]


def test_time_clustering_against_uniform():
    burst = analysis.time_clustering([10, 12, 14, 500, 900], window=5, span=1000)
    assert burst["clusters"] == [[10, 12, 14]] and burst["close_gaps"] == 2 and burst["clustered"]
    assert burst["expected_fraction"] == pytest.approx(1 - math.exp(-5 * 5 / 1000))
    spread = analysis.time_clustering([100, 300, 500, 700, 900], window=50, span=1000)
    assert spread["close_gaps"] == 0 and not spread["clustered"] and spread["verdict"] == "not clustered"
    # A window as wide as the spacing of uniform spikes cannot tell bursts from chance.
    wide = analysis.time_clustering([40, 60, 75, 100, 130], window=50, span=160)
    assert not wide["clustered"] and wide["verdict"].startswith("cannot tell")


def test_partial_logs_never_crash(tmp_path):
    """A corrupt middle line, a truncated last line and no spikes.jsonl: what is there is reported."""
    log_dir = tmp_path / "logs"
    logs.write_run(log_dir, spikes_file=False)
    lines = (log_dir / "metrics.jsonl").read_text().split("\n")
    lines[9] = lines[9][:30]  # iteration 10 garbled in the middle of the file
    lines.insert(20, '{"iteration": "twenty", "loss": 1.0}')  # line 21: parses, but is not a record
    (log_dir / "metrics.jsonl").write_text("\n".join(lines))
    (log_dir / "events.jsonl").unlink()
    report = build_report(log_dir)
    notes = " | ".join(report["notes"])
    assert "metrics.jsonl:10: not valid JSON" in notes and "metrics.jsonl:181: last line truncated" in notes
    assert "metrics.jsonl:21: iteration 'twenty' is not an integer" in notes
    assert "spikes.jsonl missing: 5 spikes derived" in notes and "events.jsonl missing" in notes
    assert report["summary"]["steps_executed"] == 178
    assert [s["iteration"] for s in report["spikes"]] == [40, 60, 75, 100, 130]
    # The step a rollback ended is labelled rollback, although only "skipped" was logged for it.
    assert [s["action"] for s in report["spikes"]] == ["skip", "skip", "skip", "rollback", "warn"]
    [rb] = report["rollbacks"]
    assert (rb["iteration"], rb["to_iteration"], rb["inferred"]) == (100, 80, True)
    # The window statistics are recomputed with the detector's rule, so recovery is still measured.
    assert _spike(report, 40)["recovery_iters"] == 3
    # Samples come from the consumed-samples range, and say so.
    s40 = _spike(report, 40)
    assert s40["samples"] == list(range(39 * 16, 40 * 16)) and s40["samples_derived"]


def test_spike_lost_to_a_kill_is_rebuilt_from_metrics(tmp_path):
    """Killed while writing the rollback's spike record: the metrics still show the skipped step."""
    logs.write_run(tmp_path, truncate=False)
    lines = (tmp_path / "spikes.jsonl").read_text().splitlines()
    assert json.loads(lines[3])["iteration"] == 100
    (tmp_path / "spikes.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:50])
    report = build_report(tmp_path)
    notes = " | ".join(report["notes"])
    assert "spikes.jsonl:4: last line truncated" in notes
    assert "1 skipped or non-finite steps have no spikes.jsonl record (iterations 100)" in notes
    assert [(s["iteration"], s["action"], s["derived"]) for s in report["spikes"]] == [
        (40, "skip", False), (60, "skip", False), (75, "skip", False), (100, "rollback", True)]
    assert _spike(report, 100)["recovery_iters"] == 1


def test_tensorboard_only_logs(tmp_path):
    sim = logs.write_tensorboard_only(tmp_path)
    report = build_report(tmp_path)
    assert report["source"] == "tensorboard" and report["config"] is None
    assert report["summary"]["steps_executed"] == 180 and report["summary"]["last_iteration"] == 160
    [rb] = report["rollbacks"]
    assert (rb["iteration"], rb["to_iteration"]) == (100, 80)
    assert {s["iteration"]: s["action"] for s in report["spikes"]} == {
        40: "skip", 60: "skip", 75: "skip", 100: "rollback", 130: "warn"}
    # The later line wins: iteration 100 on the timeline is the replay, not the spike.
    series = report["series"]
    at100 = series["loss"][series["iteration"].index(100)]
    replay = [m for m in sim["metrics"] if m["iteration"] == 100][-1]
    assert at100 == pytest.approx(replay["loss"], rel=1e-6) and at100 < 5  # float32 in TensorBoard
    assert report["advice"] and {a["rule"] for a in report["advice"]} == {"nonfinite"}


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    import spike_report

    assert spike_report.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such log directory" in err
    (tmp_path / "metrics.jsonl").write_text("")
    assert spike_report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no metrics to report on" in err
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1, "lo')  # killed during the first line
    assert spike_report.main([str(tmp_path)]) == 2
    with pytest.raises(ReportError):
        build_report(tmp_path)


def test_cli_json_outputs_and_skip_list(run, tmp_path):
    log_dir, sim, _ = run
    out_dir, skip = tmp_path / "out", tmp_path / "skip.txt"
    proc = subprocess.run([sys.executable, "tools/spike_report.py", str(log_dir), "--out-dir", str(out_dir),
                           "--json", "--skip-list", str(skip), "--top", "3"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr

    def strict(name):
        raise AssertionError(f"non-strict JSON constant {name}")
    report = json.loads(proc.stdout, parse_constant=strict)
    assert len(report["top"]) == 3 and _spike(report, 60)["loss"] == "NaN"
    assert sorted(p.name for p in out_dir.iterdir()) == ["loss.png", "report.html", "report.json"]
    assert Path(report["outputs"]["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Skip list: the samples of the batches that never reached the weights (skip and rollback).
    text = skip.read_text()
    samples = [int(line) for line in text.splitlines() if line and not line.startswith("#")]
    expected = [k for s in sim["spikes"] if s["action"] in ("skip", "rollback") for k in s["samples"]]
    assert samples == expected and len(samples) == 4 * 16
    assert report["skip_list"] == {"path": str(skip), "samples": 64, "batches": 4}
    assert "# iteration 40: skip (loss_zscore)" in text and "junk.jsonl:7" in text
    assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))


def test_write_skip_list_from_log_dir(run, tmp_path):
    log_dir, _, report = run
    assert write_skip_list(log_dir, tmp_path / "a.txt") == write_skip_list(report, tmp_path / "b.txt") | {
        "path": str(tmp_path / "a.txt")}
    assert (tmp_path / "a.txt").read_text() == (tmp_path / "b.txt").read_text()


def test_plot_keeps_the_curve_readable_under_huge_spikes():
    losses = np.concatenate([np.linspace(5, 3, 200), [1e6, np.nan]])
    top = plot._top_limit(losses)
    assert 5 < top < 20  # the 1e6 spike is drawn as a marker on the top edge instead


# ----------------------------------------------------------------------------------------------
# The HTML page in a real browser


def _chromium() -> str | None:
    import os
    import shutil

    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("MEGALLM_INSTALL_CHROMIUM") == "1":
        subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium",
                       shell=True, capture_output=True, timeout=900)
        found = shutil.which("chromium")
    return found


def _screenshot(browser: str, page: Path, png: Path, profile: Path) -> str:
    """Render `page` headless; returns Chromium's log (console messages appear as CONSOLE lines)."""
    import os

    # Without a session bus Chromium waits ~25 s for D-Bus before rendering; tell it there is none.
    env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS="disabled:")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--window-size=1280,1400",
           f"--screenshot={png}", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert png.exists(), proc.stderr[-2000:]
    return proc.stdout + proc.stderr


def test_html_report_in_headless_chromium(run, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium, or set MEGALLM_INSTALL_CHROMIUM=1)")
    from matplotlib import image

    log_dir, _, report = run
    paths = write_outputs(report, tmp_path / "report")
    shot = tmp_path / "report.png"
    log = _screenshot(browser, Path(paths["html"]), shot, tmp_path / "profile")
    console = [line for line in log.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == [], console
    # The plot is on screen: its loss line is matplotlib's tab:blue, which nothing else on the page uses.
    pixels = (image.imread(shot)[..., :3] * 255).round().astype(int)
    blue = (np.abs(pixels - [31, 119, 180]).sum(axis=-1) < 30).sum()
    assert blue > 300, f"plot not visible in the screenshot ({blue} loss-line pixels): {shot}"
    artifact = REPO / "runs" / "artifacts" / "spike_report_screenshot.png"
    try:
        artifact.parent.mkdir(parents=True, exist_ok=True)
        artifact.write_bytes(shot.read_bytes())
    except OSError:
        artifact = None
    print(f"spike report screenshot: {shot}" + (f" (copied to {artifact})" if artifact else ""))

    # The console check can fail: a page with a script error is caught the same way.
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><p>x</p><script>undefinedFunction();</script></body></html>")
    log = _screenshot(browser, bad, tmp_path / "bad.png", tmp_path / "profile2")
    assert any("Uncaught ReferenceError" in line for line in log.splitlines())
