"""Suspect documents: the report's side of training/forensics.py.

Reads what the last-stage ranks wrote (each data-parallel rank its own files, merged here):
    suspects-dp<R>.jsonl        one line per document segment whose robust z passed suspect_zscore
    segment_losses-dp<R>.jsonl  one line per iteration: median and 5/95% quantiles of segment losses
(a plain suspects.jsonl, e.g. merged by hand, is read as well), and ranks the documents: a document
flagged in several iterations, or far out, is more likely bad data than one borderline segment.
Evidence = the sum over the document's flagged segments of the larger |z| (mean or spread).
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections import defaultdict
from pathlib import Path

SKIP_SOURCES = ("spikes", "suspects", "both")


def _read_jsonl(paths) -> list[dict]:
    rows = []
    for path in paths:
        lines = Path(path).read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if number < len(lines):  # only the last line of a killed run may be cut short
                    raise
    return rows


def read_suspects(log_dir: str | Path) -> list[dict]:
    d = Path(log_dir)
    paths = sorted(d.glob("suspects-dp*.jsonl")) + ([d / "suspects.jsonl"] if (d / "suspects.jsonl").exists() else [])
    return sorted(_read_jsonl(paths), key=lambda r: (r["iteration"], r.get("dp_rank", 0), r["sample"], r["document"]))


def read_segment_summaries(log_dir: str | Path) -> list[dict]:
    return _read_jsonl(sorted(Path(log_dir).glob("segment_losses-dp*.jsonl")))


def _direction(row: dict) -> str:
    """high: less predictable than the text around it (noise); low: more (repetition); uniform /
    erratic: its per-token losses vary far less / more than text's."""
    if abs(row["z"]) >= abs(row.get("z_spread", 0.0)):
        return "high" if row["z"] > 0 else "low"
    return "erratic" if row["z_spread"] > 0 else "uniform"


def suspect_documents(rows: list[dict]) -> list[dict]:
    """One entry per flagged document, most evidence first."""
    by_doc: dict = defaultdict(list)
    for r in rows:
        by_doc[(r.get("dataset"), r["document"])].append(r)
    docs = []
    for (dataset, document), group in by_doc.items():
        strongest = [max(r["z"], r.get("z_spread", 0.0), key=abs) for r in group]
        worst = max(group, key=lambda r: max(abs(r["z"]), abs(r.get("z_spread", 0.0))))
        docs.append({
            "source": group[0]["source"], "document": document, "dataset": dataset,
            "occurrences": len(group), "max_abs_z": max(abs(z) for z in strongest),
            "direction": _direction(worst), "evidence": round(sum(abs(z) for z in strongest), 3),
            "mean_loss": round(sum(r["mean_loss"] for r in group) / len(group), 5),
            "tokens": sum(r["tokens"] for r in group),
            "iterations": sorted({r["iteration"] for r in group}),
            "samples": sorted({r["sample"] for r in group}),
        })
    return sorted(docs, key=lambda d: (-d["evidence"], d["source"]))


def section(log_dir: str | Path, config) -> tuple[list[dict], dict]:
    """(report["suspect_documents"], report["suspects"]): the ranked documents, and what the table and
    plot need (flagged segments, per-iteration segment-loss quantiles, the thresholds used)."""
    rows = read_suspects(log_dir)
    summaries = read_segment_summaries(log_dir)
    per_iteration: dict = defaultdict(list)
    for s in summaries:
        if s.get("segments") and math.isfinite(s.get("median", float("nan"))):
            per_iteration[s["iteration"]].append(s)
    its = sorted(per_iteration)
    series = {"iteration": its,
              "median": [sum(s["median"] for s in per_iteration[i]) / len(per_iteration[i]) for i in its],
              "p05": [min(s["p05"] for s in per_iteration[i]) for i in its],
              "p95": [max(s["p95"] for s in per_iteration[i]) for i in its]}
    spike = getattr(config, "spike", None)
    info = {"segments": rows, "series": series, "scored_iterations": len(its),
            "suspect_zscore": getattr(spike, "suspect_zscore", None),
            "suspect_min_tokens": getattr(spike, "suspect_min_tokens", None)}
    return suspect_documents(rows), info


# ------------------------------------------------------------------------------------------------
COLUMNS = ["rank", "source", "document", "occurrences", "max |z|", "direction", "mean loss", "iterations"]


def table_rows(report: dict, limit: int = 20) -> list[list[str]]:
    rows = []
    for n, d in enumerate(report.get("suspect_documents") or [], 1):
        if n > limit:
            break
        its = d["iterations"]
        rows.append([str(n), d["source"], str(d["document"]), str(d["occurrences"]), f"{d['max_abs_z']:.1f}",
                     d["direction"], f"{d['mean_loss']:.3f}",
                     ", ".join(map(str, its[:5])) + (f" +{len(its) - 5}" if len(its) > 5 else "")])
    return rows


def summary_line(report: dict) -> str | None:
    info = report.get("suspects")
    if not info or not info["scored_iterations"]:
        return None
    docs = report["suspect_documents"]
    return (f"suspect documents: {len(docs)} ({len(info['segments'])} flagged segments in "
            f"{info['scored_iterations']} scored iterations; |robust z| of mean or spread > {info['suspect_zscore']}, "
            f">= {info['suspect_min_tokens']} tokens)")


def render_text(report: dict, console) -> None:
    line = summary_line(report)
    if line is None:
        return
    from rich.table import Table

    if not report["suspect_documents"]:
        console.print(line)
        return
    table = Table(title=line, title_justify="left")
    for c in COLUMNS:
        table.add_column(c, overflow="fold")
    for row in table_rows(report):
        table.add_row(*row)
    console.print(table)


def figure(report: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    info = report["suspects"]
    s = info["series"]
    fig, ax = plt.subplots(figsize=(11, 3.8))
    ax.fill_between(s["iteration"], s["p05"], s["p95"], color="tab:blue", alpha=0.2, lw=0,
                    label="segments, 5-95%")
    ax.plot(s["iteration"], s["median"], color="tab:blue", lw=1, label="segment median")
    for direction, color, marker in (("high", "tab:red", "^"), ("low", "tab:purple", "v"),
                                     ("uniform", "tab:green", "s"), ("erratic", "tab:orange", "D")):
        pts = [(r["iteration"], r["mean_loss"]) for r in info["segments"] if _direction(r) == direction]
        if pts:
            ax.scatter(*zip(*pts), color=color, marker=marker, s=25, zorder=5,
                       label=f"suspect: {direction} ({len(pts)})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("document segment mean loss")
    ax.set_title("per-document loss; suspects marked", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig, plt


def render_png(report: dict, dpi: int = 100) -> bytes:
    fig, plt = figure(report)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def render_html(report: dict) -> str:
    """The HTML page's section: plot and table ("" when the run scored no segments)."""
    import html

    line = summary_line(report)
    if line is None:
        return ""
    image = base64.b64encode(render_png(report)).decode("ascii")
    parts = ["<h2>Suspect documents</h2>", f"<p>{html.escape(line)}</p>",
             f'<img id="suspects" alt="document segment loss over iterations" src="data:image/png;base64,{image}">']
    rows = table_rows(report)
    if rows:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
        parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------
def suspect_samples(report: dict) -> list[int]:
    return sorted({s for d in report.get("suspect_documents") or [] for s in d["samples"]})


def write_skip_list(report: dict, path: str | Path, source: str = "spikes") -> dict:
    """The skip list from the skipped batches (spikes), the suspects' samples, or both: the format
    --exclude-samples reads. Returns {"path", "samples", "batches"}, + "suspect_documents" unless
    the source is spikes."""
    from megallm.files import atomic_write
    from megallm.report.build import skip_batches
    from megallm.report.outputs import skip_list_text

    if source not in SKIP_SOURCES:
        raise ValueError(f"--skip-list-from {source!r}: must be one of {', '.join(SKIP_SOURCES)}")
    if source == "spikes":
        from megallm.report.outputs import write_skip_list as write_spikes

        return write_spikes(report, path)  # today's list and answer, unchanged
    text = skip_list_text(report) if source == "both" else f"# megallm skip list from {report['log_dir']}\n"
    seen = {int(line) for line in text.splitlines() if line and not line.startswith("#")}
    docs = report.get("suspect_documents") or []
    lines = [f"# suspect documents (|robust z| > {(report.get('suspects') or {}).get('suspect_zscore')}): "
             f"{len(docs)}"]
    for d in docs:
        fresh = [s for s in d["samples"] if s not in seen]
        seen.update(fresh)
        lines.append(f"# {d['source']} (document {d['document']}): {d['occurrences']} flagged, max |z| "
                     f"{d['max_abs_z']:.1f}, loss {d['direction']}")
        lines += [str(s) for s in fresh]
    text += "\n".join(lines) + "\n"
    atomic_write(path, text)
    samples = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    return {"path": str(path), "samples": samples,
            "batches": len(skip_batches(report)) if source == "both" else 0, "suspect_documents": len(docs)}
