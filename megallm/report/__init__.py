"""Explain a finished (or crashed) run from its log directory: spikes, skips, rollbacks, recovery,
the data in the bad batches, and what to change. The CLI is tools/spike_report.py.

    report = build_report("runs/tiny")           # JSON-able dict
    paths = write_outputs(report, "runs/tiny/report")   # report.html, loss.png, report.json
    write_skip_list(report, "skip.txt")           # for pretrain_llama2.py --exclude-samples
"""

from megallm.report.build import build_report
from megallm.report.logs import ReportError, load_run
from megallm.report.outputs import to_json, write_outputs, write_skip_list

__all__ = ["build_report", "write_outputs", "write_skip_list", "to_json", "load_run", "ReportError"]
