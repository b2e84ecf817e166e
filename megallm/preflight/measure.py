"""Timed measurements on this rank: GEMM, host-to-device copy, all-reduce, send/recv.

Each runs one warmup (allocation, kernel selection, connection setup), then up to `reps` timed
repetitions, fewer when the warmup says they would not fit in `budget_s`: a 100 Mbit/s link then
costs one repetition, not ten. Both ends of a transfer must repeat it equally often, so the count is
agreed on (max of warmup times over an all-reduce group, the receiver's choice for a send/recv pair).
The result is the median repetition (best=False): robust to one preempted repetition and honest
about sustained speed; on a CPU box shared with other work (best=True, the cpu profile) other
processes can only add time, so the fastest repetition is the closest to the rank's own speed.
Bandwidths are in GB/s (1e9 bytes/s), as nccl-tests reports them.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist

from megallm.preflight.profiles import Timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(step: Callable[[], None], device: torch.device) -> float:
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def reps_for(warmup_s: float, timing: Timing) -> int:
    return max(1, min(timing.reps, int(timing.budget_s / max(warmup_s, 1e-9))))


def pick(times: list[float], timing: Timing) -> float:
    return min(times) if timing.best else statistics.median(times)


def gemm_tflops(device: torch.device, dtype: torch.dtype, n: int, timing: Timing) -> float:
    """Dense n x n x n GEMM throughput: 2 n^3 FLOPs per product."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    step = lambda: torch.matmul(a, b, out=c)  # noqa: E731
    if device.type == "cuda":
        # Events time the kernels alone, without the launch gaps of a synchronising loop; a few
        # warmups let cuBLAS settle on its kernel and the clocks ramp up.
        for _ in range(3):
            step()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(timing.reps)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        seconds = pick([s.elapsed_time(e) / 1e3 for s, e in events], timing)
    else:
        reps = reps_for(_clock(step, device), timing)
        seconds = pick([_clock(step, device) for _ in range(reps)], timing)
    return 2 * n**3 / seconds / 1e12


def h2d_gbps(device: torch.device, nbytes: int, timing: Timing) -> float:
    """Pinned host memory to device copy bandwidth (the path data and offloaded state take)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    step = lambda: dst.copy_(src, non_blocking=True)  # noqa: E731
    reps = reps_for(_clock(step, device), timing)
    return nbytes / pick([_clock(step, device) for _ in range(reps)], timing) / 1e9


def allreduce_busbw(group, group_size: int, nbytes: int, device: torch.device, timing: Timing) -> float:
    """All-reduce bus bandwidth: algbw x 2(n-1)/n, the bytes each rank's link carries in a ring
    all-reduce, so the number compares with the link's speed whatever the group size."""
    x = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)
    step = lambda: dist.all_reduce(x, group=group)  # noqa: E731
    warm = torch.tensor([_clock(step, device)], dtype=torch.float64, device=device)
    dist.all_reduce(warm, op=dist.ReduceOp.MAX, group=group)  # every member repeats equally often
    reps = reps_for(warm.item(), timing)
    seconds = pick([_clock(step, device) for _ in range(reps)], timing)
    return nbytes / seconds * 2 * (group_size - 1) / group_size / 1e9


def _exchange(sends: list[int], recvs: list[int], out: torch.Tensor, into: list[torch.Tensor]) -> None:
    ops = [dist.P2POp(dist.isend, out, d) for d in sends] + [dist.P2POp(dist.irecv, t, s) for s, t in zip(recvs, into)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()


def p2p_gbps(round_links: list[tuple[int, int]], rank: int, nbytes: int, device: torch.device,
             timing: Timing) -> dict[tuple[int, int], float]:
    """Run one round of send/recv pairs (each rank sends and receives at most once) and return the
    bandwidth of the link this rank receives on, timed at the receiver: the transfer ends there."""
    sends = [dst for src, dst in round_links if src == rank]
    recvs = [src for src, dst in round_links if dst == rank]
    if not sends and not recvs:
        return {}
    out = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    into = [torch.empty(nbytes // 4, dtype=torch.float32, device=device) for _ in recvs]
    warm = _clock(lambda: _exchange(sends, recvs, out, into), device)
    # The receiver decides how often its link repeats and tells the sender.
    mine = torch.tensor([reps_for(warm, timing)], dtype=torch.int64, device=device)
    theirs = [torch.zeros(1, dtype=torch.int64, device=device) for _ in sends]
    _exchange(recvs, sends, mine, theirs)  # reversed: receivers send their counts to their senders
    send_reps = [int(t.item()) for t in theirs]
    recv_reps = int(mine.item()) if recvs else 0
    times = []
    for i in range(max(send_reps + [recv_reps])):
        active_sends = [d for d, n in zip(sends, send_reps) if i < n]
        active_recvs = recvs if i < recv_reps else []
        elapsed = _clock(lambda: _exchange(active_sends, active_recvs, out, into), device)
        if active_recvs:
            times.append(elapsed)
    return {(src, rank): nbytes / pick(times, timing) / 1e9 for src in recvs}
