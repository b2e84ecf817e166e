"""The verdict for people (a rich table of checks x nodes, then who is bad and why) and for
machines (--json-out with every measurement, --hosts-out with the fit hosts, one per line)."""

from __future__ import annotations

import json
import sys
from typing import Optional

from rich.console import Console
from rich.table import Table

from megallm.files import atomic_write
from megallm.preflight.checks import FAIL, PASS, SKIP, WARN, Result, bad_nodes, fmt, healthy_nodes, passed

STYLE = {PASS: "green", WARN: "yellow", FAIL: "bold red", SKIP: "dim"}


def _cell(r: Optional[Result]) -> str:
    if r is None:
        return ""
    value = f" {fmt(r.value)} {r.unit}".rstrip() if r.value is not None else ""
    return f"[{STYLE[r.status]}]{r.status}[/]{value}"


def table(results: list[Result], node_names: dict[int, str]) -> Table:
    checks = list(dict.fromkeys(r.check for r in results))
    world = any(r.node is None for r in results)
    t = Table(title="megallm preflight", show_lines=False)
    t.add_column("check")
    t.add_column("threshold", overflow="fold", max_width=34)
    if world:
        t.add_column("world")
    for node, name in sorted(node_names.items()):
        t.add_column(f"node {node}\n{name}")
    cells = {(r.check, r.node): r for r in results}
    for check in checks:
        threshold = next((r.threshold for r in results if r.check == check and r.threshold), "")
        row = [check, threshold] + ([_cell(cells.get((check, None)))] if world else [])
        t.add_row(*row, *[_cell(cells.get((check, node))) for node in sorted(node_names)])
    return t


def summary_lines(results: list[Result], node_names: dict[int, str]) -> list[str]:
    """Bad nodes first, each with every reason; then warnings; then the verdict."""
    lines = []
    for node, reasons in sorted(bad_nodes(results).items(), key=lambda kv: (kv[0] is not None, kv[0] or 0)):
        who = "world" if node is None else f"node {node} ({node_names.get(node, '?')})"
        lines += [f"FAIL {who}: {reason}" for reason in reasons]
    for r in results:
        if r.status == WARN:
            who = "world" if r.node is None else f"node {r.node} ({node_names.get(r.node, '?')})"
            lines.append(f"WARN {who}: {r.check}: {r.detail}")
    fit = healthy_nodes(results, node_names)
    verdict = "PASS" if passed(results) else "FAIL"
    lines.append(f"{verdict}: {len(fit)}/{len(node_names)} nodes fit" + (f" ({', '.join(node_names[n] for n in fit)})"
                                                                         if fit else ""))
    return lines


def print_report(results: list[Result], node_names: dict[int, str], notes: list[str] = (),
                 console: Optional[Console] = None) -> None:
    # A log file gets wide lines rather than a table wrapped at 80 columns.
    console = console or Console(width=None if sys.stdout.isatty() else 200, highlight=False)
    console.print(table(results, node_names))
    for note in notes:
        console.print(f"note: {note}", markup=False)
    for line in summary_lines(results, node_names):
        console.print(line, markup=False)


def write_json(path: str, measurements: dict, results: list[Result]) -> None:
    doc = {"passed": passed(results), "bad_nodes": {str(k): v for k, v in bad_nodes(results).items()},
           "results": [r.to_dict() for r in results], "measurements": measurements}
    atomic_write(path, json.dumps(doc, indent=1, default=str) + "\n")


def write_hosts(path: str, results: list[Result], node_names: dict[int, str]) -> None:
    atomic_write(path, "".join(f"{node_names[n]}\n" for n in healthy_nodes(results, node_names)))
