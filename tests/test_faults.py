"""Process-level faults: preemption signals, kill -9, a kill during a save, damaged checkpoint files,
and a hung rank restarted by nvidia-resiliency-ext's ft_launcher. Two ranks (pp 2) keep it cheap.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch import ROOT, descendants, free_port, kill_tree

pytestmark = pytest.mark.slow

ARGS = ["--config", "configs/tiny.yaml", "--pp", "2", "--eval-interval", "0", "--no-tensorboard",
        "--lr-warmup-iters", "2", "--log-interval", "1"]
ENV = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def launch(*extra, env=None, launcher=("-m", "torch.distributed.run")):
    cmd = [sys.executable, *launcher, "--nproc-per-node", "2", "--master-port", str(free_port()),
           "launch/pretrain_llama2.py", *ARGS, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV | (env or {}), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(proc, timeout=300):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        raise
    return proc.returncode, out


def records(log_dir):
    path = Path(log_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def wait_for_iteration(log_dir, iteration, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r["iteration"] >= iteration for r in records(log_dir)):
            return
        assert proc.poll() is None, finish(proc)[1][-3000:]
        time.sleep(0.2)
    raise AssertionError(f"iteration {iteration} not reached")


def worker_pids(proc):
    """The training ranks: torchrun's descendants running the launch script."""
    def is_rank(pid):
        try:
            return "pretrain_llama2.py" in Path(f"/proc/{pid}/cmdline").read_text()
        except FileNotFoundError:
            return False

    return [pid for pid in descendants(proc.pid) if is_rank(pid)]


def test_sigterm_checkpoints_at_the_next_boundary_and_exits_0(tmp_path):
    log, save = tmp_path / "log", tmp_path / "ckpt"
    proc = launch("--train-iters", "200", "--log-dir", str(log), "--save", str(save), "--async-save")
    wait_for_iteration(log, 3, proc)
    assert len(worker_pids(proc)) == 2
    for pid in worker_pids(proc):  # a scheduler signals every task of the job
        os.kill(pid, signal.SIGTERM)
    code, out = finish(proc)
    assert code == 0, out[-3000:]
    last = records(log)[-1]["iteration"]
    assert last < 200
    assert (save / "latest_checkpointed_iteration.txt").read_text() == str(last)
    meta = json.loads((save / f"iter_{last:07d}" / "meta.json").read_text())
    assert meta["iteration"] == last and meta["trainer"]["consumed_samples"] == 16 * last
    assert any(json.loads(line)["event"] == "signal" for line in (log / "events.jsonl").read_text().splitlines())


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A run killed with -9 on one rank after its checkpoint at iteration 6."""
    tmp = tmp_path_factory.mktemp("kill9")
    log, save = tmp / "log", tmp / "ckpt"
    proc = launch("--train-iters", "200", "--log-dir", str(log), "--save", str(save), "--save-interval", "3")
    wait_for_iteration(log, 8, proc)
    os.kill(worker_pids(proc)[-1], signal.SIGKILL)
    code, out = finish(proc)
    assert code != 0
    return tmp, records(log)


def test_kill_9_then_resume_repeats_the_lost_iterations_exactly(killed_run, tmp_path):
    tmp, before = killed_run
    save = tmp_path / "ckpt"
    shutil.copytree(tmp / "ckpt", save)
    latest = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert latest >= 6
    log = tmp_path / "log"
    code, out = finish(launch("--train-iters", str(latest + 3), "--log-dir", str(log), "--save", str(save),
                              "--load", str(save)))
    assert code == 0, out[-3000:]
    assert f"resumed from {save} at iteration {latest}" in out
    after = {r["iteration"]: r["loss"] for r in records(log)}
    assert list(after) == [latest + 1, latest + 2, latest + 3]
    seen = {r["iteration"]: r["loss"] for r in before}
    for it, loss in after.items():
        if it in seen:
            assert loss == seen[it], it  # bitwise: the same iteration, recomputed after the kill


def test_damaged_checkpoint_file_falls_back_to_the_previous_one(killed_run, tmp_path):
    tmp, _ = killed_run
    save = tmp_path / "ckpt"
    shutil.copytree(tmp / "ckpt", save)
    latest = int((save / "latest_checkpointed_iteration.txt").read_text())
    damaged = save / f"iter_{latest:07d}" / "model" / "rank_00001.safetensors"  # pp stage 1's layers
    data = bytearray(damaged.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the tensor data: only the checksum can see it
    damaged.write_bytes(bytes(data))
    log = tmp_path / "log"
    code, out = finish(launch("--train-iters", str(latest + 1), "--log-dir", str(log), "--load", str(save)))
    assert code == 0, out[-3000:]
    assert f"{damaged}: checksum mismatch (corrupted; written by rank 1)" in out
    assert f"fell back to {save / f'iter_{latest - 3:07d}'}" in out
    assert records(log)[0]["iteration"] == latest - 2

    # an explicitly named damaged checkpoint is an error that names the file, not a silent fallback
    damaged.write_bytes(bytes(data[: len(data) // 2]))
    code, out = finish(launch("--train-iters", str(latest + 1), "--log-dir", str(tmp_path / "log2"),
                              "--load", str(save / f"iter_{latest:07d}")))
    assert code != 0
    assert f"{damaged}:" in out and "truncated" in out


def test_kill_during_save_leaves_the_previous_checkpoint_as_latest(tmp_path):
    log, save = tmp_path / "log", tmp_path / "ckpt"
    code, out = finish(launch("--train-iters", "9", "--log-dir", str(log), "--save", str(save), "--save-interval", "3",
                              env={"MEGALLM_CRASH_IN_SAVE": "6"}))
    assert code != 0
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert (save / "iter_0000006.partial").is_dir() and not (save / "iter_0000006").exists()
    code, out = finish(launch("--train-iters", "9", "--log-dir", str(log), "--save", str(save), "--save-interval", "3",
                              "--load", str(save)))
    assert code == 0, out[-3000:]
    assert "resumed from" in out and "at iteration 3" in out
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "9"
    assert not (save / "iter_0000006.partial").exists()


def test_kill_9_during_an_async_write_leaves_the_previous_checkpoint_as_latest(tmp_path):
    log, save = tmp_path / "log", tmp_path / "ckpt"
    # the writers of checkpoint 6 stall for a minute: training goes on, and is killed meanwhile
    proc = launch("--train-iters", "200", "--log-dir", str(log), "--save", str(save), "--save-interval", "3",
                  "--async-save", env={"MEGALLM_SLOW_SAVE": "6:60"})
    wait_for_iteration(log, 8, proc)  # two iterations past the save: the loop did not wait for the write
    assert (save / "iter_0000006.partial").is_dir() and not (save / "iter_0000006").exists()
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "3"
    os.kill(worker_pids(proc)[0], signal.SIGKILL)
    code, _ = finish(proc)
    assert code != 0
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "3" and not (save / "iter_0000006").exists()
    code, out = finish(launch("--train-iters", "7", "--log-dir", str(tmp_path / "log2"), "--save", str(save),
                              "--save-interval", "3", "--async-save", "--load", str(save)))
    assert code == 0, out[-3000:]
    assert f"resumed from {save} at iteration 3" in out
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "6"
    assert [r["iteration"] for r in records(tmp_path / "log2")] == [4, 5, 6, 7]


def test_hung_rank_is_restarted_by_ft_launcher_from_the_last_checkpoint(tmp_path):
    pytest.importorskip("nvidia_resiliency_ext")
    ft = shutil.which("ft_launcher", path=str(Path(sys.executable).parent))
    assert ft, "ft_launcher is installed with nvidia-resiliency-ext"
    log, save, marker = tmp_path / "log", tmp_path / "ckpt", tmp_path / "hung"
    cmd = [ft, "--nproc-per-node", "2", "--max-restarts", "1", "--master-port", str(free_port()),
           "--ft-initial-rank-heartbeat-timeout", "90", "--ft-rank-heartbeat-timeout", "15",
           "launch/pretrain_llama2.py", *ARGS, "--train-iters", "8", "--log-dir", str(log),
           "--save", str(save), "--save-interval", "2", "--load", str(save)]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV | {"MEGALLM_HANG": f"1:5:{marker}"}, capture_output=True,
                          text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert marker.exists()  # rank 1 did hang at iteration 5
    events = [json.loads(line) for line in (log / "events.jsonl").read_text().splitlines()]
    resumes = [e for e in events if e["event"] == "resume"]
    assert resumes and resumes[-1]["iteration"] == 4  # restarted from the checkpoint before the hang
    its = [r["iteration"] for r in records(log)]
    assert its[-1] == 8 and its.count(5) == 1  # iteration 5 never finished before the restart
    print(f"hang detected and job restarted; total {time.time() - start:.0f} s")
