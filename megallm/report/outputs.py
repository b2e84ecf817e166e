"""Files the report writes: report.html + loss.png, report.json, and the skip list.

Every file is written under a temporary name in its directory and renamed into place, so a killed
report never leaves a half-written file that a rerun would read as an exclusion list.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from megallm.files import atomic_write
from megallm.report.build import build_report, skip_batches


def _strict(x):
    """Non-finite floats as the strings "NaN"/"Infinity"/"-Infinity": strict JSON that browsers and
    jq accept (the run logs themselves use bare NaN literals, which only Python reads)."""
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    return x


def to_json(report: dict, indent: int | None = 1) -> str:
    return json.dumps(_strict(report), indent=indent, allow_nan=False)


def write_outputs(report: dict, out_dir: str | Path) -> dict:
    """report.html (plot embedded), loss.png and report.json in out_dir; returns their paths."""
    from megallm.report import html, plot  # matplotlib only when pictures are asked for

    out_dir = Path(out_dir)
    png = plot.render_png(report)
    paths = {"png": str(atomic_write(out_dir / "loss.png", png)),
             "html": str(atomic_write(out_dir / "report.html", html.render(report, png))),
             "json": str(atomic_write(out_dir / "report.json", to_json(report)))}
    return paths


def skip_list_text(report: dict) -> str:
    """One global dataset sample index per line; `#` comments name each batch's iteration, why it was
    flagged and its documents' sources (the format launch/pretrain_llama2.py --exclude-samples reads)."""
    batches = skip_batches(report)
    lines = [f"# megallm skip list from {report['log_dir']}",
             "# one global dataset sample index per line; read by pretrain_llama2.py --exclude-samples"]
    seen = set()
    for b in batches:
        note = " (range of consumed samples; no spikes.jsonl sample list)" if b["samples_derived"] else ""
        lines.append(f"# iteration {b['iteration']}: {b['action']} ({b['reason']}), loss {b['loss']}{note}")
        if b["sources"]:
            lines.append("#   sources: " + ", ".join(b["sources"]))
        for entry in b.get("documents") or []:
            lines.append(f"#   sample {entry.get('sample')}: {entry.get('dataset')} documents {entry.get('documents')}")
        fresh = [s for s in b["samples"] if s not in seen]
        seen.update(fresh)
        lines += [str(s) for s in fresh]
    if not batches:
        lines.append("# no skipped batch with known samples in this run")
    return "\n".join(lines) + "\n"


def write_skip_list(report_or_log_dir: dict | str | Path, path: str | Path) -> dict:
    """Write the skip list; returns {"path", "samples", "batches"} (counts)."""
    report = report_or_log_dir if isinstance(report_or_log_dir, dict) else build_report(report_or_log_dir)
    text = skip_list_text(report)
    samples = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    atomic_write(path, text)
    return {"path": str(path), "samples": samples, "batches": len(skip_batches(report))}
