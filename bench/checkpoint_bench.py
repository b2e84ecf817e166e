"""Checkpoint save/load at tp 2 x pp 2 x dp 2 with ZeRO-1 (megallm's distributed optimizer,
megallm/parallel/distributed_optimizer.py) on 8 CPU ranks: the v1 writer (gather each stage onto one
rank; megallm/checkpoint/v1.py) against the sharded v2 writer (every rank writes its own pieces),
blocking and --async-save, in one torchrun launch. Writes bench/results/checkpoint.md (--out).

    python bench/checkpoint_bench.py                 # 0.17 B parameters, a quick look
    python bench/checkpoint_bench.py --hidden 1536 --layers 16 --ffn 4096 --heads 12   # 0.55 B: results/checkpoint.md

0.55 B is the largest model the v1 writer survives on a 24 GiB machine (memory peaked at 23.6 GiB in
the v1 save); at 0.74 B (--hidden 1792 --ffn 4864 --heads 14) the kernel killed a v1 stage writer
at 5.9 GB resident, because it holds its stage's weights and moments whole. The v1 writer now assembles each
parameter's moments from the distributed optimizer's flat ranges (sharded_state()) with one
all-reduce per parameter over data parallel, so it holds one parameter's moments at a time besides
what the stage writer keeps whole; v2's per-rank figures scale linearly with the model.

Per rank and phase: wall time of the collective call, bytes written / read by the process
(/proc/self/io wchar / rchar), and the peak resident memory during the phase (VmHWM, reset
through /proc/self/clear_refs before each phase) next to the resident memory before it. The model
state is built directly (weights initialised, Adam moments filled for the fp32 master pieces this
rank steps, i.e. the distributed optimizer's own partition) without a training step, one rank after
the other, and the fp32 gradient buffers are released, so gradients do not crowd the machine.
The loop stall is the time `checkpoint.save` blocks its caller; for --async-save the time until
the checkpoint is committed is reported beside it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Worker (one per rank, under torchrun)


def _proc(field: str, path: str = "/proc/self/status") -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


class Phase:
    """Measures one collective phase on this rank."""

    def __enter__(self):
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        self.rss0 = _proc("VmRSS:")
        self.w0, self.r0 = _proc("wchar:", "/proc/self/io"), _proc("rchar:", "/proc/self/io")
        self.t0, self.cpu0, self.main0 = time.perf_counter(), time.process_time(), time.thread_time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.cpu, self.main_cpu = time.process_time() - self.cpu0, time.thread_time() - self.main0
        self.written = _proc("wchar:", "/proc/self/io") - self.w0
        self.read = _proc("rchar:", "/proc/self/io") - self.r0
        self.peak_kib, self.before_kib = _proc("VmHWM:"), self.rss0

    def row(self) -> dict:
        return {"s": self.seconds, "cpu": self.cpu, "main_cpu": self.main_cpu, "written": self.written,
                "read": self.read,
                "peak_gib": self.peak_kib / 2**20, "before_gib": self.before_kib / 2**20}


class BenchTrainer:
    """What checkpoint.save/load use of a Trainer, without data or gradients."""

    def __init__(self, cfg, chunks, optimizer):
        from megallm.training.metrics import MetricsLogger

        self.cfg, self.chunks, self.optimizer = cfg, chunks, optimizer
        self.iteration, self.consumed_samples = 1, cfg.training.global_batch_size
        self.logger = MetricsLogger(cfg.logging.log_dir, enabled=False)
        self.device = __import__("torch").device("cpu")

    def state_dict(self) -> dict:  # the keys that mark a training (not model-only) checkpoint
        return {"iteration": self.iteration, "consumed_samples": self.consumed_samples, "scheduler": {},
                "detector": {}, "policy": {}}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = state.get("iteration", 0)


def worker(out: Path, args) -> None:
    import torch
    import torch.distributed as dist

    from megallm import checkpoint
    from megallm.checkpoint import v1
    from megallm.config import apply_overrides, load_yaml
    from megallm.model import weight_mapping as wm
    from megallm.parallel.pipeline import build_model_chunks
    from megallm.parallel.topology import initialize_model_parallel
    from megallm.training.optimizer import build_optimizer

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = apply_overrides(load_yaml(ROOT / "configs/tiny.yaml"), {
        "num_layers": args.layers, "hidden_size": args.hidden, "ffn_hidden_size": args.ffn,
        "num_attention_heads": args.heads, "num_query_groups": args.heads, "vocab_size": 32000,
        "tp": 2, "pp": 2, "use_distributed_optimizer": True, "tensorboard": False,
        "save": str(out / "v2"), "log_dir": str(out / "log")})
    initialize_model_parallel(2, 2)
    from megatron.core import parallel_state as ps

    # One rank at a time: a rank's build peaks at ~3x its weights (the weights, the flat buffer they
    # move into, the fp32 grad buffer), which 8 ranks at once would not fit beside each other.
    for turn in range(dist.get_world_size()):
        if turn == rank:
            torch.manual_seed(0)
            chunks = build_model_chunks(cfg, torch.device("cpu"))
            for chunk in chunks:
                wm.init_weights(chunk, cfg, ps.get_tensor_model_parallel_rank())
            optimizer = build_optimizer(chunks, cfg)
            for bucket in optimizer.buckets:  # a checkpoint holds no gradients: give their memory back
                bucket.grads.untyped_storage().resize_(0)
            gc.collect()
        dist.barrier()
    g = torch.Generator().manual_seed(rank)
    for master in (m for group in optimizer.optimizer.param_groups for m in group["params"]):
        optimizer.optimizer.state[master] = {
            "step": torch.tensor(1.0), "exp_avg": torch.randn(master.shape, generator=g) * 1e-3,
            "exp_avg_sq": torch.rand(master.shape, generator=g) * 1e-6}
    optimizer.steps = 1  # the step the checkpoint records (sharded_state's scalars); loads restore moments
    tr = BenchTrainer(cfg, chunks, optimizer)
    params = sum(p.numel() for c in chunks for p in c.parameters())
    rows = {"params_local": params}

    def phase(name, fn):
        dist.barrier()
        with Phase() as ph:
            fn()
            dist.barrier()
        rows[name] = ph.row()

    v1_bytes = []
    if not args.v2_only:
        phase("v1 save", lambda: v1_bytes.append(v1.save_v1(tr, out / "v1")[1]))
    phase("v2 save (blocking)", lambda: checkpoint.save(tr, async_save=False))
    tr.iteration = 2
    dist.barrier()
    with Phase() as stall:
        checkpoint.save(tr, async_save=True)
    with Phase() as total:
        checkpoint.wait_for_pending()
        dist.barrier()
    rows["v2 save (async): stall"] = stall.row()
    rows["v2 save (async): stall"]["committed_s"] = stall.seconds + total.seconds
    rows["v2 save (async): stall"]["written"] += total.written
    rows["v2 save (async): stall"]["cpu_committed"] = stall.cpu + total.cpu
    rows["v2 save (async): stall"]["peak_gib"] = max(stall.peak_kib, total.peak_kib) / 2**20
    if not args.v2_only:
        phase("v1 load", lambda: checkpoint.load(tr, out / "v1" / "iter_0000001"))
    phase("v2 load", lambda: checkpoint.load(tr, out / "v2" / "iter_0000001"))
    meta = json.loads((out / "v2" / "iter_0000001" / "meta.json").read_text())
    rows["v2_files"] = len(meta["files"])
    if not args.v2_only:
        rows["v1_file_bytes"] = v1_bytes[0]
        rows["v1_files"] = len(json.loads((out / "v1" / "iter_0000001" / "meta.json").read_text())["files"])
    rows["v2_bytes_by_writer"] = sum(r["bytes"] for r in meta["files"].values() if r["writer_rank"] == rank)
    (out / f"rank_{rank}.json").write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Driver


def gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def report(out: Path, args, wall: float, load: tuple[float, float]) -> str:
    sys.path.insert(0, str(ROOT / "bench"))  # benchlib is a sibling script module, not a package
    from benchlib import cpu_model, git_commit, ram_gib, table

    ranks = [json.loads((out / f"rank_{r}.json").read_text()) for r in range(8)]
    params = sum(r["params_local"] for r in ranks) // 2  # dp 2 replicas hold the same parameters
    v1 = "v1 save" in ranks[0]
    phases = [ph for ph in ("v1 save", "v2 save (blocking)", "v2 save (async): stall", "v1 load", "v2 load")
              if ph in ranks[0]]
    files_written = {"v2 save (blocking)": [r["v2_bytes_by_writer"] for r in ranks],
                     "v2 save (async): stall": [r["v2_bytes_by_writer"] for r in ranks]}
    if v1:
        files_written["v1 save"] = [r["v1_file_bytes"] for r in ranks]
    lines = [
        "# Checkpoint save and load: v1 (gather per stage) against v2 (every rank writes its pieces)" if v1 else
        "# Checkpoint save and load: v2 (every rank writes its pieces), without v1 (--v2-only)",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC · {cpu_model()} · {os.cpu_count()} cores, "
        f"{ram_gib():.0f} GiB RAM · commit {git_commit()} · `python bench/checkpoint_bench.py "
        f"--hidden {args.hidden} --layers {args.layers} --ffn {args.ffn} --heads {args.heads}"
        f"{' --v2-only' if args.v2_only else ''}` ({wall:.0f} s; "
        f"1-minute load average {load[0]:.0f} before, {load[1]:.0f} after: the machine was shared)",
        "",
        f"Model: {params / 1e9:.2f} B parameters (hidden {args.hidden}, {args.layers} layers, ffn {args.ffn}, "
        f"vocab 32000), fp32 weights + Adam moments; 8 ranks (tp 2 x pp 2 x dp 2), ZeRO-1 "
        "(megallm's distributed optimizer), gloo, one local disk.",
        "",
        "Wall seconds on an oversubscribed machine say little; CPU seconds (all threads of the rank) are",
        "what a rank spends whatever the load. *Main-thread CPU* is what the training loop pays.",
        "",
        "| phase | wall s (slowest rank) | CPU s per rank (max) | main-thread CPU s (max) | file GiB written per "
        "rank (min .. max) | GiB read() per rank (min .. max) | peak RSS above start, GiB (max) | VmHWM GiB (max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ph in phases:
        rs = [r[ph] for r in ranks]
        wall_s = f"{max(x['s'] for x in rs):.2f}"
        cpu = f"{max(x['cpu'] for x in rs):.2f}"
        if "committed_s" in rs[0]:
            wall_s += f" (committed after {max(x['committed_s'] for x in rs):.2f})"
            cpu += f" (with the writer thread: {max(x['cpu_committed'] for x in rs):.2f})"
        fw = files_written.get(ph)
        lines.append("| " + " | ".join([
            ph, wall_s, cpu, f"{max(x['main_cpu'] for x in rs):.2f}",
            f"{gib(min(fw))} .. {gib(max(fw))}" if fw else "0",
            f"{gib(min(x['read'] for x in rs))} .. {gib(max(x['read'] for x in rs))}",
            f"{max(x['peak_gib'] - x['before_gib'] for x in rs):.2f}", f"{max(x['peak_gib'] for x in rs):.2f}"]) + " |")
    lines += ["", "## Per rank: file GiB written / peak RSS above the phase's start, GiB", ""]
    per = [[i, *([f"{gib(r['v1_file_bytes'])} / {r['v1 save']['peak_gib'] - r['v1 save']['before_gib']:.2f}"]
                 if v1 else []),
            f"{gib(r['v2_bytes_by_writer'])} / "
            f"{r['v2 save (blocking)']['peak_gib'] - r['v2 save (blocking)']['before_gib']:.2f}",
            f"{gib(r['v2_bytes_by_writer'])} / "
            f"{r['v2 save (async): stall']['peak_gib'] - r['v2 save (async): stall']['before_gib']:.2f}"]
           for i, r in enumerate(ranks)]
    lines.append(table(["rank", *(["v1 save"] if v1 else []), "v2 blocking", "v2 async"], per))
    files = f"v1 {ranks[0]['v1_files']}, v2 {ranks[0]['v2_files']}" if v1 else f"v2 {ranks[0]['v2_files']}"
    lines += ["", f"Files: {files} (+ meta.json each). File bytes "
              "written: v2 from meta.json's writer_rank, v1 from the files each rank wrote. GiB read(): "
              "/proc/self/io rchar, i.e. the sha256 checks of every file a rank touches (safetensors reads "
              "the slices through mmap, not read()) plus gloo's socket reads. Loads read the checkpoint "
              "written at the same layout; v1 through the v2 reader (whole tensors as pieces). Peak RSS: "
              "VmHWM after resetting it through /proc/self/clear_refs at the start of the phase.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "checkpoint.md")
    p.add_argument("--v2-only", action="store_true",
                   help="leave out the v1 writer (it holds a stage whole: a ~1 B model does not fit 24 GiB with it)")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args)
        return 0
    scratch = Path(tempfile.mkdtemp(prefix="ckpt_bench_"))
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "8", "--master-port",
               str(_free_port()), __file__, "--worker", str(scratch), "--hidden", str(args.hidden), "--layers",
               str(args.layers), "--ffn", str(args.ffn), "--heads", str(args.heads)] + ["--v2-only"] * args.v2_only
        env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        start, load_before = time.perf_counter(), os.getloadavg()[0]
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        text = report(scratch, args, time.perf_counter() - start, (load_before, os.getloadavg()[0]))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
