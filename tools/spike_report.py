"""Explain a finished (or crashed) run: spikes, skips, rollbacks, recovery, bad data, advice.

    python tools/spike_report.py runs/tiny                      # summary + runs/tiny/report/report.html
    python tools/spike_report.py runs/tiny --json > report.json
    python tools/spike_report.py runs/tiny --skip-list skip.txt # then: pretrain_llama2.py --exclude-samples skip.txt
    python tools/spike_report.py runs/tiny --replay --spike-method mad --spike-zscore 5
                                        # what another detector would have flagged on the same losses
    python tools/spike_report.py runs/tiny --skip-list skip.txt --skip-list-from both   # + suspect documents

Exit status: 0 report written, 2 bad input (missing directory, no metrics, bad flags).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megallm.report import ReportError, build_report, suspects, text, to_json, write_outputs
from megallm.report.logs import load_run
from megallm.report.replay import compare
from megallm.training.spikes import METHODS

REPLAY_FIELDS = ("spike_method", "spike_zscore", "spike_grad_zscore", "spike_window", "spike_min_history",
                 "spike_suspicious_zscore", "spike_log_loss")


def replay_text(args) -> str:
    run = load_run(args.log_dir)
    overrides = {k: getattr(args, k) for k in REPLAY_FIELDS if getattr(args, k) is not None}
    out = compare(run, overrides)
    lines = [f"replay of {args.log_dir}: {out['steps']} logged steps, detector {out['detector']}",
             f"  the run flagged {len(out['run'])}: {out['run_text']}",
             f"  the replay flags {len(out['replay'])}: {out['replay_text']}",
             f"  flagged by both {len(out['both'])}; only by the run {out['only_run']}; only by the replay "
             f"{out['only_replay']}"]
    def z(x):
        return "-" if x is None else f"{x:.1f}"

    lines += [f"  iteration {d['iteration']}: loss {d['loss']:.4f} (z {z(d['loss_zscore'])}), grad norm "
              f"{d['grad_norm']:.4g} (z {z(d['grad_zscore'])}) -> {d['reason']}" for d in out["flagged"][:args.top]]
    if len(out["flagged"]) > args.top:
        lines.append(f"  ... {len(out['flagged']) - args.top} more (--top N)")
    lines.append("  note: the losses after a step the replay would have skipped are the run's own, so a "
                 "replay shows where a rule fires, not how the run would have gone")
    return "\n".join(lines) + "\n"


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
    replay = parser.add_argument_group("replay", "re-run a spike detector over the run's metrics.jsonl")
    replay.add_argument("--replay", action="store_true", help="print what the detector would have flagged")
    replay.add_argument("--spike-method", choices=METHODS, help="detector (default: the run's)")
    for flag, kind in (("--spike-zscore", float), ("--spike-grad-zscore", float), ("--spike-window", int),
                       ("--spike-min-history", int), ("--spike-suspicious-zscore", float)):
        replay.add_argument(flag, type=kind, help="default: the run's")
    replay.add_argument("--spike-log-loss", action=argparse.BooleanOptionalAction, default=None,
                        help="judge log(loss) (default: the run's)")
    args = parser.parse_args(argv)
    if args.top < 0:
        parser.error("--top must be at least 0")
    if args.replay:
        try:
            print(replay_text(args), end="")
        except ReportError as e:
            print(f"spike_report: {e}", file=sys.stderr)
            return 2
        return 0
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
