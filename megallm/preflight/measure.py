"""Timed measurements on this rank: GEMM, host-to-device copy, all-reduce, send/recv.

Each runs one warmup (allocation, kernel selection, connection setup), then up to `reps` timed
repetitions within `budget_s`: a 100 Mbit/s link costs its warmup alone, not twenty repetitions. The GEMM is
timed in turns (class Gemm); a local copy repeats until the budget is spent; both ends of a transfer must repeat it
equally often, so there the count comes from the warmup and is agreed on (the max of warmup times
over an all-reduce group, the receiver's choice for a send/recv pair).
The result is the median repetition (best=False): robust to one preempted repetition and honest
about sustained speed; on a CPU box shared with other work (best=True, the cpu profile) other
processes can only add time, so the fastest repetition is the closest to the rank's own speed.
Bandwidths are in GB/s (1e9 bytes/s), as nccl-tests reports them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

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
    """Timed repetitions that fit the budget; 0 when the warmup alone overran it, and then the
    warmup is the measurement (a 100 Mbit/s link is no faster the second time)."""
    return min(timing.reps, int(timing.budget_s / max(warmup_s, 1e-9)))


def repeat_for_budget(step: Callable[[], None], device: torch.device, timing: Timing, least: int = 3) -> list[float]:
    """Times of step() after a warmup, repeated until the budget is spent (at least `least`, at most
    timing.reps times). For a measurement no other rank takes part in (a copy): nothing to agree on,
    and a warmup slowed by a burst of outside load does not cut the repetitions short."""
    _clock(step, device)
    times, start = [], time.perf_counter()
    while len(times) < timing.reps and (len(times) < least or time.perf_counter() - start < timing.budget_s):
        times.append(_clock(step, device))
    return times


def pick(times: list[float], timing: Timing) -> float:
    return min(times) if timing.best else statistics.median(times)


class Gemm:
    """A dense n x n x n GEMM (2 n^3 FLOPs), allocated and warmed up once, then timed in turns:
    on a shared CPU box many short turns spread over seconds, so one burst of outside load cannot
    cover them all; on a GPU one turn, as training runs."""

    def __init__(self, device: torch.device, dtype: torch.dtype, n: int):
        self.device, self.flops = device, 2 * n**3
        self.a = torch.randn(n, n, device=device, dtype=dtype)
        self.b = torch.randn(n, n, device=device, dtype=dtype)
        self.c = torch.empty(n, n, device=device, dtype=dtype)
        for _ in range(3 if device.type == "cuda" else 1):  # cuBLAS picks its kernel, clocks ramp up
            self.step()
        _sync(device)

    def step(self) -> None:
        torch.matmul(self.a, self.b, out=self.c)

    def seconds(self, reps: int) -> list[float]:
        if self.device.type != "cuda":
            return [_clock(self.step, self.device) for _ in range(reps)]
        # Events time the kernels alone, without the launch gaps of a synchronising loop.
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            self.step()
            end.record()
        torch.cuda.synchronize(self.device)
        return [s.elapsed_time(e) / 1e3 for s, e in events]


def h2d_gbps(device: torch.device, nbytes: int, timing: Timing) -> float:
    """Pinned host memory to device copy bandwidth (the path data and offloaded state take)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    step = lambda: dst.copy_(src, non_blocking=True)  # noqa: E731
    return nbytes / pick(repeat_for_budget(step, device, timing), timing) / 1e9


def allreduce_busbw(group, group_size: int, nbytes: int, device: torch.device, timing: Timing) -> float:
    """All-reduce bus bandwidth: algbw x 2(n-1)/n, the bytes each rank's link carries in a ring
    all-reduce, so the number compares with the link's speed whatever the group size."""
    x = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)
    step = lambda: dist.all_reduce(x, group=group)  # noqa: E731
    warm = torch.tensor([_clock(step, device)], dtype=torch.float64, device=device)
    dist.all_reduce(warm, op=dist.ReduceOp.MAX, group=group)  # every member repeats equally often
    reps = reps_for(warm.item(), timing)
    seconds = pick([_clock(step, device) for _ in range(reps)] or [warm.item()], timing)
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
    return {(src, rank): nbytes / pick(times or [warm], timing) / 1e9 for src in recvs}
