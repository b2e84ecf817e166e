"""Launch the distributed test workers (tests/distributed/) under torchrun from a test, with a free port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(c) for c in children] + [d for c in children for d in descendants(int(c))]


def kill_tree(pid: int) -> None:
    import signal

    for p in descendants(pid) + [pid]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def torchrun(nproc: int, script: str, *args: str, timeout: int = 600, env: dict | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), script, *args]
    full_env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"} | (env or {})
    popen = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(popen.pid)  # torch elastic starts each rank in a session of its own
        raise
    proc = subprocess.CompletedProcess(cmd, popen.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_scenarios(nproc: int, out: Path, scenarios: list[dict], config: str = "configs/tiny.yaml",
                  timeout: int = 600, env: dict | None = None,
                  worker: str = "tests/distributed/train_worker.py") -> dict[str, dict]:
    out.mkdir(parents=True, exist_ok=True)
    spec = out / f"spec_{nproc}_{scenarios[0]['name']}.json"
    spec.write_text(json.dumps({"config": str(ROOT / config), "out": str(out), "scenarios": scenarios}))
    torchrun(nproc, worker, str(spec), timeout=timeout, env=env)
    return {sc["name"]: json.loads((out / f"{sc['name']}.json").read_text()) for sc in scenarios}
