"""The report as terminal text (rich table), and the per-spike table rows the HTML page reuses."""

from __future__ import annotations

import io
import math

from rich.console import Console
from rich.table import Table

from megallm.report import suspects

# "mean" and "std" are the detector's center and scale of the loss at the spike (median or trend
# and robust sigma for the robust methods); "recovery" is in steps (see build.py).
COLUMNS = ["iter", "loss", "mean", "std", "loss z", "grad z", "grad norm", "lr", "action", "recovery",
           "documents"]


def fmt(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "NaN"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return f"{x:.{digits}g}"
    return str(x)


def documents_cell(spike: dict, limit: int = 2) -> str:
    """Where the batch came from: documents also seen in other spikes first, then file:line sources
    when the data carries provenance, else document or sample ids."""
    repeated = spike.get("repeated_documents") or []
    if repeated:
        rest = len(spike["sources"]) - len(repeated)
        return ", ".join(repeated) + (f" +{rest} other documents" if rest > 0 else "")
    if spike["sources"]:
        shown = spike["sources"][:limit]
        more = len(spike["sources"]) - len(shown)
        return ", ".join(shown) + (f" +{more} more" if more else "")
    if spike.get("documents"):
        ids = [f"{e.get('dataset')}:{d}" for e in spike["documents"] for d in e.get("documents") or []]
        return ", ".join(ids[:limit]) + (f" +{len(ids) - limit} more" if len(ids) > limit else "")
    if spike.get("samples"):
        s = spike["samples"]
        return f"samples {s[0]}..{s[-1]} ({len(s)})" + (" derived" if spike.get("samples_derived") else "")
    return "-"


def recovery_cell(spike: dict) -> str:
    if spike["recovery_iters"] is not None:
        n = spike["recovery_iters"]
        return f"{n} step" + ("s" if n != 1 else "")
    return "never" if spike["recovery_threshold"] is not None else "-"


def table_rows(report: dict) -> list[list[str]]:
    """Rows of the top-N spike table, most severe first."""
    rows = []
    for i in report["top"]:
        s = report["spikes"][i]
        rows.append([str(s["iteration"]), fmt(s["loss"]), fmt(s["loss_mean"]), fmt(s["loss_std"], 3),
                     fmt(s["loss_zscore"], 3), fmt(s["grad_zscore"], 3), fmt(s["grad_norm"], 3),
                     fmt(s["lr"], 3), f"{s['action']} ({s['reason']})", recovery_cell(s), documents_cell(s)])
    return rows


def render(report: dict, width: int = 160) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, highlight=False)
    console.print(f"spike report: {report['log_dir']} (metrics from {report['source']})")
    for line in report["summary_lines"]:
        console.print(f"  {line}", soft_wrap=True)
    for note in report["notes"]:
        console.print(f"  note: {note}", soft_wrap=True)
    if report["top"]:
        table = Table(title=f"top {len(report['top'])} of {len(report['spikes'])} spikes, most severe first",
                      title_justify="left")
        for c in COLUMNS:
            if c == "documents":
                table.add_column(c, min_width=30, overflow="fold")
            else:
                table.add_column(c, no_wrap=True)
        for row in table_rows(report):
            table.add_row(*row)
        console.print(table)
    suspects.render_text(report, console)
    console.print("advice:" if report["advice"] else "advice: nothing to change")
    for a in report["advice"]:
        console.print(f"  - {a['message']}\n      evidence: {a['evidence']}", soft_wrap=True)
    return console.file.getvalue()
