"""Tolerant readers for a run's log directory (the contract is in docs/spike_report.md).

A run can be killed mid-write, so every reader keeps what parses, never raises on a partial line,
and returns human-readable notes saying what it dropped. The report prints those notes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from megallm.config import Config


class ReportError(Exception):
    """Input the report cannot be built from (missing directory, no metrics): one line for the user."""


@dataclass
class RunLog:
    log_dir: str
    source: str  # "jsonl" or "tensorboard": where the per-iteration metrics came from
    metrics: list[dict]  # in execution order; iterations repeat after a rollback
    spikes: list[dict]  # spikes.jsonl records, or derived from metrics when the file is missing
    events: list[dict]
    run_info: dict  # run.json without its config
    config: Optional[Config]
    config_source: Optional[str]  # "config.yaml" or "run.json"
    notes: list[str] = field(default_factory=list)
    spikes_derived: bool = False


# ----------------------------------------------------------------------------------------------
# JSON lines


def read_jsonl(path: Path, required: tuple[str, ...] = ()) -> tuple[list[dict], list[str]]:
    """Parse a JSON-lines file line by line; (records, notes about what was dropped).

    json.loads accepts the NaN/Infinity literals the training loop writes for non-finite values.
    A last line without its newline that does not parse is a write cut short by a kill.
    """
    records, notes = [], []
    data = path.read_bytes()
    lines = data.split(b"\n")
    ends_cleanly = data.endswith(b"\n") or not data
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        is_last = number == len(lines) and not ends_cleanly
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if is_last:
                notes.append(f"{path.name}:{number}: last line truncated ({len(raw)} bytes, the run was "
                             f"probably killed mid-write); ignored")
            else:
                notes.append(f"{path.name}:{number}: not valid JSON; line skipped")
            continue
        if not isinstance(record, dict):
            notes.append(f"{path.name}:{number}: not a JSON object; line skipped")
            continue
        missing = [k for k in required if k not in record]
        if missing:
            notes.append(f"{path.name}:{number}: missing {', '.join(missing)}; line skipped")
            continue
        if "iteration" in required and (not isinstance(record["iteration"], int)
                                        or isinstance(record["iteration"], bool)):
            notes.append(f"{path.name}:{number}: iteration {record['iteration']!r} is not an integer; line skipped")
            continue
        records.append(record)
    return records, notes


# ----------------------------------------------------------------------------------------------
# The resolved config: config.yaml beside the logs, else the copy inside run.json


def config_from_dict(raw: dict) -> tuple[Config, list[str]]:
    """Defaults overlaid with a saved config dict; fields this version does not know are reported,
    not fatal, since a report must read logs written by other versions."""
    cfg, unknown = Config(), []
    for section, values in (raw or {}).items():
        target = getattr(cfg, section, None)
        if target is None or not dataclasses.is_dataclass(target) or not isinstance(values, dict):
            unknown.append(str(section))
            continue
        names = {f.name for f in dataclasses.fields(target)}
        for name, value in values.items():
            if name in names:
                setattr(target, name, value)
            else:
                unknown.append(f"{section}.{name}")
    return cfg, unknown


def _read_run_info(log_dir: Path, notes: list[str]) -> tuple[dict, Optional[Config], Optional[str]]:
    run_info, raw_config, where = {}, None, None
    run_json = log_dir / "run.json"
    if run_json.exists():
        try:
            run_info = json.loads(run_json.read_text())
            raw_config, where = run_info.pop("config", None), "run.json"
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            notes.append("run.json: not valid JSON (rewritten at a restart and cut short?); ignored")
            run_info = {}
    config_yaml = log_dir / "config.yaml"
    if config_yaml.exists():
        try:
            loaded = yaml.safe_load(config_yaml.read_text())
            if isinstance(loaded, dict):
                raw_config, where = loaded, "config.yaml"
            else:
                notes.append("config.yaml: not a mapping of sections; ignored")
        except yaml.YAMLError:
            notes.append("config.yaml: not valid YAML; ignored")
    if not isinstance(raw_config, dict):
        notes.append("no saved config (config.yaml or run.json): config advice skipped; spike thresholds "
                     "taken as megallm defaults")
        return run_info, None, None
    cfg, unknown = config_from_dict(raw_config)
    if unknown:
        notes.append(f"{where}: fields unknown to this version ignored: {', '.join(unknown)}")
    return run_info, cfg, where


# ----------------------------------------------------------------------------------------------
# TensorBoard fallback

TB_TAGS = {
    "train/loss": "loss",
    "train/lr": "lr",
    "train/grad_norm": "grad_norm",
    "train/skipped": "skipped",
    "train/loss_zscore": "loss_zscore",
    "train/grad_zscore": "grad_zscore",
    "train/tokens_per_sec": "tokens_per_sec",
    "val/loss": "val_loss",
}


def read_tensorboard(tb_dir: Path) -> list[dict]:
    """Per-iteration records rebuilt from TensorBoard scalars, in execution order.

    purge_orphaned_data=False keeps the steps a rollback re-ran (TensorBoard would otherwise drop
    the first pass), so rollbacks stay visible; size_guidance 0 keeps every point instead of a
    reservoir sample. A step seen for the k-th time in one tag joins the k-th time in the others.
    """
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        str(tb_dir), size_guidance={"scalars": 0, "tensors": 0}, purge_orphaned_data=False)
    acc.Reload()
    tags = acc.Tags()
    by_key: dict[tuple[int, int], dict] = {}
    for tag, name in TB_TAGS.items():
        if tag in tags.get("scalars", []):
            points = [(e.wall_time, e.step, float(e.value)) for e in acc.Scalars(tag)]
        elif tag in tags.get("tensors", []):  # written with tensorboard.summary (v2 API)
            from tensorboard.util import tensor_util
            points = [(e.wall_time, e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
                      for e in acc.Tensors(tag)]
        else:
            continue
        seen: dict[int, int] = {}
        for wall_time, step, value in points:
            k = seen.get(step, 0)
            seen[step] = k + 1
            record = by_key.setdefault((step, k), {"iteration": step, "_time": wall_time})
            record[name] = value
    records = sorted(by_key.values(), key=lambda r: (r["_time"], r["iteration"]))
    for r in records:
        del r["_time"]
        r["skipped"] = bool(r.get("skipped", 0.0) >= 0.5)
    return [r for r in records if "loss" in r or "val_loss" in r]


def _tensorboard_dir(log_dir: Path) -> Optional[Path]:
    for candidate in (log_dir / "tensorboard", log_dir):
        if candidate.is_dir() and any(candidate.glob("events.out.tfevents.*")):
            return candidate
    return None


# ----------------------------------------------------------------------------------------------
# Spikes from metrics alone (spikes.jsonl missing, or TensorBoard-only logs)


def derive_spikes(metrics: list[dict], cfg: Config) -> list[dict]:
    """Flagged iterations rebuilt from metrics, with the training loop's own detector
    (megallm.training.spikes via report/replay.py): a step is a spike when the run logged it as one
    (skip_reason, skipped, a non-finite loss) or, for logs that do not say (TensorBoard), when the
    replayed detector flags it. Center and scale are the detector's at that step, so the recovery
    band is defined."""
    from megallm.report.replay import replay_metrics

    s = cfg.spike
    decisions = replay_metrics(metrics, s, cfg.checkpoint.save_interval)
    spikes = []
    for position, (r, d) in enumerate(zip(metrics, decisions)):
        if d is None or not d.spike:
            continue
        lz = r.get("loss_zscore", d.loss_zscore)
        gz = r.get("grad_zscore", d.grad_zscore)
        end, gbs = r.get("consumed_samples"), r.get("global_batch_size")
        spikes.append({
            "iteration": r["iteration"], "loss": d.loss, "grad_norm": r.get("grad_norm"),
            "lr": r.get("lr"), "loss_mean": d.loss_mean, "loss_std": d.loss_std,
            "grad_norm_mean": d.grad_norm_mean, "grad_norm_std": d.grad_norm_std,
            "loss_zscore": lz, "grad_zscore": gz, "method": d.method,
            "zscore_threshold": s.spike_zscore, "grad_zscore_threshold": s.spike_grad_zscore,
            "reason": r.get("skip_reason") or (d.reason if d.reason != "logged" else
                                               "nonfinite_loss" if not math.isfinite(d.loss) else "loss_zscore"),
            "action": "skip" if r.get("skipped") else "warn",
            "consumed_samples_start": end - gbs if end is not None and gbs else None,
            "consumed_samples_end": end, "samples": None, "documents": None, "derived": True,
            "position": position,
        })
    return spikes


def _fill_missing_spikes(recorded: list[dict], metrics: list[dict], cfg: Config, notes: list[str]) -> list[dict]:
    """Skipped or non-finite steps with no spikes.jsonl record (the run died between writing the
    metrics line and the spike line) are added from the metrics, in execution order."""
    from megallm.report.analysis import match_spikes

    have = {s["iteration"] for s in recorded}
    extra = [d for d in derive_spikes(metrics, cfg)
             if d["iteration"] not in have
             and (metrics[d["position"]].get("skipped") or d["reason"].startswith("nonfinite"))]
    if not extra:
        return recorded
    notes.append(f"{len(extra)} skipped or non-finite steps have no spikes.jsonl record (iterations "
                 f"{', '.join(str(d['iteration']) for d in extra)}); derived from metrics.jsonl")
    for s, p in zip(recorded, match_spikes(metrics, recorded)):
        s["position"] = p if p is not None else math.inf
    return sorted(recorded + extra, key=lambda s: s["position"])


# ----------------------------------------------------------------------------------------------


def load_run(log_dir: str | Path) -> RunLog:
    """Everything the report needs from LOG_DIR; ReportError when there is nothing to report on."""
    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        raise ReportError(f"{log_dir}: no such log directory (pass the run's logging.log_dir)")
    notes: list[str] = []
    run_info, cfg, config_source = _read_run_info(log_dir, notes)

    source, metrics = "jsonl", []
    metrics_path = log_dir / "metrics.jsonl"
    if metrics_path.exists():
        metrics, metric_notes = read_jsonl(metrics_path, required=("iteration",))
        notes += metric_notes
    if not metrics:
        tb_dir = _tensorboard_dir(log_dir)
        if tb_dir is not None:
            metrics = read_tensorboard(tb_dir)
            source = "tensorboard"
            why = "absent" if not metrics_path.exists() else "empty"
            notes.append(f"metrics.jsonl {why}: {len(metrics)} iterations read from TensorBoard event "
                         f"files in {tb_dir.name}/ (float32 values; no per-batch samples or documents)")
    if not metrics:
        raise ReportError(f"{log_dir}: no metrics to report on (metrics.jsonl missing or empty, and no "
                          f"TensorBoard event files under tensorboard/); is this a megallm log directory?")

    events = []
    if (log_dir / "events.jsonl").exists():
        events, event_notes = read_jsonl(log_dir / "events.jsonl", required=("event",))
        notes += event_notes
    elif source == "jsonl":
        notes.append("events.jsonl missing: rollbacks inferred from iteration numbers going back")

    spikes, derived = [], False
    spikes_path = log_dir / "spikes.jsonl"
    if spikes_path.exists():
        spikes, spike_notes = read_jsonl(spikes_path, required=("iteration",))
        notes += spike_notes
        spikes = _fill_missing_spikes(spikes, metrics, cfg or Config(), notes)
    else:
        spikes, derived = derive_spikes(metrics, cfg or Config()), True
        notes.append(f"spikes.jsonl missing: {len(spikes)} spikes derived from the metrics (skipped steps, "
                     f"non-finite losses, z-scores over threshold); their batches' samples are unknown")
    return RunLog(str(log_dir), source, metrics, spikes, events, run_info, cfg, config_source, notes, derived)
