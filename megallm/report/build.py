"""build_report(log_dir) -> one JSON-able dict that the text, HTML, plot and skip list all read."""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

from megallm.report import advice, analysis, suspects
from megallm.report.analysis import finite
from megallm.report.logs import RunLog, load_run

NOT_APPLIED = ("skip", "rollback", "stop")  # actions whose batch never reached the weights


def _spike_row(spike: dict, recovery: dict, sample_range_ok: bool) -> dict:
    row = {k: spike.get(k) for k in (
        "iteration", "loss", "loss_mean", "loss_std", "loss_zscore", "grad_zscore", "grad_norm", "lr",
        "zscore_threshold", "grad_zscore_threshold", "reason", "action",
        "consumed_samples_start", "consumed_samples_end", "samples", "documents")}
    row["derived"] = bool(spike.get("derived"))
    row["severity"] = analysis.severity(spike)
    row.update(recovery)
    row["sources"] = analysis.batch_sources(spike)
    row["samples_derived"] = False
    start, end = row["consumed_samples_start"], row["consumed_samples_end"]
    # Without a recorded sample list the batch is the consumed-samples range, which is only the
    # dataset's sample indices when the run excluded nothing (exclusion shifts the mapping).
    if row["samples"] is None and sample_range_ok and start is not None and end is not None:
        row["samples"], row["samples_derived"] = list(range(start, end)), True
    return row


def _series(timeline: list[dict]) -> dict:
    def col(key):
        return [r.get(key) for r in timeline]
    val = [(r["iteration"], r["val_loss"]) for r in timeline if r.get("val_loss") is not None]
    return {"iteration": col("iteration"), "loss": col("loss"), "grad_norm": col("grad_norm"),
            "lr": col("lr"), "skipped": [bool(r.get("skipped")) for r in timeline],
            "val_iteration": [v[0] for v in val], "val_loss": [v[1] for v in val]}


def _summary(run: RunLog, timeline: list[dict], spikes: list[dict], rollbacks: list[dict],
             tokens: dict) -> dict:
    losses = [r["loss"] for r in timeline if finite(r.get("loss"))]
    recovered = [s["recovery_iters"] for s in spikes if s["recovery_iters"] is not None]
    val = [r["val_loss"] for r in timeline if finite(r.get("val_loss"))]
    return {
        "first_iteration": timeline[0]["iteration"], "last_iteration": timeline[-1]["iteration"],
        "iterations": len(timeline), "steps_executed": len(run.metrics),
        "replayed_steps": len(run.metrics) - len(timeline),
        "spikes": len(spikes), "spikes_by_action": dict(Counter(s["action"] for s in spikes)),
        "spikes_by_reason": dict(Counter(s["reason"] for s in spikes)),
        "skipped_iterations": sum(bool(r.get("skipped")) for r in run.metrics),
        **tokens,
        "rollbacks": len(rollbacks),
        "recovered_spikes": len(recovered),
        "unrecovered_spike_iterations": [s["iteration"] for s in spikes
                                         if s["recovery_iters"] is None and s["recovery_threshold"] is not None],
        "median_recovery_iters": statistics.median(recovered) if recovered else None,
        "max_recovery_iters": max(recovered) if recovered else None,
        "final_loss": losses[-1] if losses else None,
        "final_val_loss": val[-1] if val else None,
        "exclude_samples": run.run_info.get("exclude_samples"),
        "num_excluded_samples": run.run_info.get("num_excluded_samples"),
        "truncated": any("truncated" in n for n in run.notes),
    }


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def _summary_lines(s: dict, rollbacks: list[dict], clustering: dict, zs: dict) -> list[str]:
    """The plain-language summary, shared by the terminal and the HTML page."""
    lines = [f"iterations {s['first_iteration']}..{s['last_iteration']} ({s['steps_executed']} steps executed, "
             f"{s['replayed_steps']} re-run after rollbacks); final loss {_fmt(s['final_loss'])}"
             + (f", final val loss {_fmt(s['final_val_loss'])}" if s["final_val_loss"] is not None else "")]
    by_action = ", ".join(f"{v} {k}" for k, v in sorted(s["spikes_by_action"].items())) or "none"
    lines.append(f"spikes: {s['spikes']} ({by_action})")
    share = s["skipped_token_share"]
    lines.append(f"skipped iterations: {s['skipped_iterations']}"
                 + (f" = {s['skipped_tokens']:,} of {s['total_tokens']:,} tokens ({100 * share:.2f}%)"
                    if share is not None else ""))
    lines.append(f"rollbacks: {len(rollbacks)}" + "".join(
        f"; at {rb['iteration']} back to {rb['to_iteration']}"
        + (f" (spikes {rb['spike_iterations']})" if rb.get("spike_iterations") else "")
        + (f", {rb['skipped_samples']} samples skipped" if rb.get("skipped_samples") else "")
        for rb in rollbacks))
    if s["spikes"]:
        lines.append(f"recovery (steps until the loss z is <= {analysis.RECOVERY_SIGMAS:g}): "
                     f"{s['recovered_spikes']} of {s['spikes']} recovered, median {_fmt(s['median_recovery_iters'])}, "
                     f"max {_fmt(s['max_recovery_iters'])}"
                     + (f"; never recovered: {s['unrecovered_spike_iterations']}"
                        if s["unrecovered_spike_iterations"] else ""))
    for key, label in (("loss_zscore", "loss"), ("grad_zscore", "grad norm")):
        if zs[key]:
            lines.append(f"largest {label} z-scores: " + ", ".join(
                f"{round(z['zscore'], 1) + 0.0:.1f} at {z['iteration']}" for z in zs[key][:3]))  # + 0.0: no "-0.0"
    t = clustering["time"]
    if t["observed_fraction"] is not None:
        lines.append(f"time clustering: {t['verdict']}: {t['close_gaps']} of {len(t['gaps'])} gaps between spikes "
                     f"within spike_skip_window={t['window']} iterations (uniform spikes: "
                     f"{100 * t['expected_fraction']:.0f}%)" + (f"; bursts {t['clusters']}" if t["clusters"] else ""))
    d = clustering["documents"]
    if d["repeated_documents"]:
        k = d["repeated_documents"][0]["spikes"]
        lines.append(f"same documents in several spikes: {len(d['repeated_documents'])} document(s), "
                     f"up to {k} spikes each")
    elif d["spikes_with_documents"]:
        lines.append(f"no document appears in more than one spike "
                     f"({d['spikes_with_documents']} spikes with provenance)")
    if s["num_excluded_samples"]:
        lines.append(f"this run excluded {s['num_excluded_samples']} samples listed in {s['exclude_samples']}")
    return lines


def build_report(log_dir: str | Path, top: int = 10) -> dict:
    """The whole report for LOG_DIR (JSON-able; non-finite floats stay floats, see outputs.to_json).

    Raises ReportError (one line) when the directory is missing or holds no metrics."""
    run = load_run(log_dir)
    timeline = analysis.timeline(run.metrics)
    rollbacks = analysis.rollbacks(run.metrics, run.events, run.spikes)
    ends = {rb["iteration"] for rb in rollbacks}
    for s in run.spikes:  # a derived spike whose step a rollback ended was rolled back, not skipped
        if s.get("derived") and s["iteration"] in ends:
            s["action"] = "rollback"
    positions = analysis.match_spikes(run.metrics, run.spikes)
    sample_range_ok = not run.run_info.get("num_excluded_samples")
    spikes = [_spike_row(s, analysis.recovery(run.metrics, p, s), sample_range_ok)
              for s, p in zip(run.spikes, positions)]
    cfg = run.config
    default_tokens = cfg.training.global_batch_size * cfg.training.seq_length if cfg else None
    tokens = analysis.token_accounting(run.metrics, default_tokens)
    window = cfg.spike.spike_skip_window if cfg else 50
    span = timeline[-1]["iteration"] - timeline[0]["iteration"] + 1
    clustering = {"time": analysis.time_clustering([s["iteration"] for s in spikes], window, span),
                  "documents": analysis.document_clustering(spikes)}
    analysis.mark_repeated_documents(spikes, clustering["documents"]["repeated_documents"])
    zs = analysis.largest_zscores(run.metrics)
    summary = _summary(run, timeline, spikes, rollbacks, tokens)
    order = sorted(range(len(spikes)), key=lambda i: (-spikes[i]["severity"], spikes[i]["iteration"]))
    suspect_documents, suspect_info = suspects.section(run.log_dir, cfg)
    return {
        "log_dir": str(run.log_dir),
        "source": run.source,
        "notes": run.notes,
        "run": run.run_info,
        "config_source": run.config_source,
        "config": cfg.to_dict() if cfg else None,
        "summary": summary,
        "summary_lines": _summary_lines(summary, rollbacks, clustering, zs),
        "spikes": spikes,
        "top": order[:top],
        "rollbacks": rollbacks,
        "largest_zscores": zs,
        "clustering": clustering,
        "advice": advice.advise(cfg, spikes, clustering["documents"]["repeated_documents"],
                                run.config_source or "defaults"),
        "series": _series(timeline),
        "suspect_documents": suspect_documents, "suspects": suspect_info,
        "recovery_rule": f"steps executed after the spike until an applied step has a finite loss whose "
                         f"detector z is <= {analysis.RECOVERY_SIGMAS:g} (without a logged z: "
                         f"<= loss_mean + {analysis.RECOVERY_SIGMAS:g} * loss_std of the spike's window)",
    }


def skip_batches(report: dict) -> list[dict]:
    """Batches that never reached the weights (skip, rollback, stop) and whose samples are known."""
    return [s for s in report["spikes"] if s["action"] in NOT_APPLIED and s["samples"]]
