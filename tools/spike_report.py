"""Explain a finished (or crashed) run: spikes, skips, rollbacks, recovery, bad data, advice.

    python tools/spike_report.py runs/tiny                      # summary + runs/tiny/report/report.html
    python tools/spike_report.py runs/tiny --json > report.json
    python tools/spike_report.py runs/tiny --skip-list skip.txt # then: pretrain_llama2.py --exclude-samples skip.txt
    python tools/spike_report.py runs/tiny --skip-list skip.txt --skip-list-from both   # + suspect documents

Exit status: 0 report written, 2 bad input (missing directory, no metrics, bad flags).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megallm.report import ReportError, build_report, to_json, write_outputs  # noqa: E402
from megallm.report import suspects, text  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log_dir", help="the run's log directory (logging.log_dir)")
    parser.add_argument("--out-dir", help="where report.html, loss.png, report.json go (default LOG_DIR/report)")
    parser.add_argument("--json", action="store_true", help="print the whole report as JSON on stdout")
    parser.add_argument("--skip-list", metavar="FILE", help="write the sample indices of skipped batches to FILE")
    parser.add_argument("--skip-list-from", choices=suspects.SKIP_SOURCES, default="spikes",
                        help="what --skip-list lists: samples of skipped batches (spikes, the default), of suspect "
                             "documents (suspects), or both")
    parser.add_argument("--top", type=int, default=10, metavar="N", help="spikes in the table (default 10)")
    args = parser.parse_args(argv)
    if args.top < 0:
        parser.error("--top must be at least 0")
    try:
        report = build_report(args.log_dir, top=args.top)
    except ReportError as e:
        print(f"spike_report: {e}", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.log_dir) / "report"
    try:
        report["outputs"] = write_outputs(report, out_dir)
        if args.skip_list:
            report["skip_list"] = suspects.write_skip_list(report, args.skip_list, args.skip_list_from)
    except OSError as e:
        print(f"spike_report: cannot write output: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(to_json(report))
        return 0
    print(text.render(report), end="")
    if args.skip_list:
        s = report["skip_list"]
        docs = f" and {s['suspect_documents']} suspect documents" if "suspect_documents" in s else ""
        print(f"skip list: {s['samples']} samples from {s['batches']} batches{docs} -> {s['path']}")
    print(f"plot: {report['outputs']['png']}")
    print(f"report: {report['outputs']['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
