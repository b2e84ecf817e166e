"""Absolute floors per machine kind, and the sizes the measurements use.

The H100 and A100 floors are the pre-launch thresholds of docs/references.md#cluster-thresholds (bandwidths
in GB/s = 1e9 bytes/s, as nccl-tests reports them). A rank or link below its floor is FAIL whatever
its peers do; relative stragglers are caught separately by the outlier rule in checks.py.
The `cpu` profile exists so the whole path runs and is tested on a 2-core box: its floors sit far
below what such a box measures (about 85 GFLOP/s fp32 per core, 1-2 GB/s gloo over a veth link) and
far above what a broken one does (a 100 Mbit/s link is 0.0125 GB/s). Its outlier rule is
|x - median| > max(MAD, 25% of median) for the GEMM and 50% for bandwidths, not production's 10%:
on this shared 2-core VM (load averages of 20-260 from other jobs) the best GEMM (256^3-768^3) of
a 0.1 s turn varied by up to 25% between turns, healthy ranks' best of 30 spread over seconds still
differed by up to 12%, and the best of 15 repetitions of a 4 MiB gloo all-reduce between two
pinned ranks ranged 2.0-3.8 ms from burst to burst. A band inside the noise flags healthy ranks;
the faults it must catch are far outside it (a busy node's GEMM is 40-65% below the median, a
100 Mbit/s link 99%).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

MiB = 1 << 20


@dataclass(frozen=True)
class Timing:
    """How measure.py repeats a measurement (see there)."""
    reps: int        # most timed repetitions after the warmup
    budget_s: float  # time the repetitions of one measurement may take
    best: bool       # keep the fastest repetition (shared CPU box) instead of the median


@dataclass(frozen=True)
class Profile:
    name: str
    gemm_dtype: str            # torch dtype name of the GEMM test
    gemm_size: int             # n of the n x n x n GEMM
    gemm_tflops: float         # floor per rank
    allreduce_intra_gbps: float  # bus bandwidth floor of a group inside one node
    allreduce_inter_gbps: float  # bus bandwidth floor of a group that spans nodes
    p2p_gbps: float            # send/recv floor per link
    h2d_gbps: Optional[float]  # host-to-device copy floor; None: nothing to copy to (CPU)
    read_gbps: float           # dataset read throughput floor per node
    message_bytes: int         # all-reduce and send/recv message size
    reps: int                  # most timed repetitions per measurement (after one warmup)
    budget_s: float            # time one measurement's repetitions may take (fewer reps on a slow link)
    min_host_memory_gb: float  # MemAvailable per node when no memory need is known
    # The outlier rule's relative floor: production's 10% where measurements repeat to within a few
    # percent (GPUs); wider where the measurement noise itself is wider (the cpu profile, above).
    compute_outlier_fraction: float
    comm_outlier_fraction: float
    # On a CPU box every rank shares the same cores (and in the namespace test, every "node" too),
    # so measurements that compare ranks run one rank or link at a time, and keep each one's best
    # repetition (other processes on the box only add time); GPUs run them concurrently, as training
    # does, and keep the median.
    serial: bool
    # Serial turns come round this many times, spread over seconds, so that a burst of outside load
    # (which on a shared VM lasts up to a second and costs a GEMM 20%) cannot hit all of one rank's.
    # The GEMM gets many short turns (~25 ms), the transfers fewer (a slow link costs ~0.35 s a turn).
    gemm_rounds: int = 1
    comm_rounds: int = 1
    gemm_turn_reps: int = 20   # GEMMs timed per turn

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def timing(self) -> Timing:
        return Timing(self.reps, self.budget_s, best=self.serial)


_GPU = dict(gemm_dtype="bfloat16", gemm_size=8192, message_bytes=256 * MiB, reps=20, budget_s=1.0,
            read_gbps=1.0, min_host_memory_gb=64.0, compute_outlier_fraction=0.1, comm_outlier_fraction=0.1,
            serial=False)
PROFILES = {
    # ~750-800 TFLOP/s dense bf16 at 8192^3: the floor is 90% of the low end. NVLink all-reduce
    # >= 460 GB/s; a 400G NIC gives 46-48 GB/s bus bandwidth and 375 Gb/s = 46.9 GB/s GPU-direct.
    "h100": Profile("h100", gemm_tflops=675.0, allreduce_intra_gbps=460.0, allreduce_inter_gbps=46.0,
                    p2p_gbps=46.9, h2d_gbps=52.0, **_GPU),
    # ~250-280 TFLOP/s; 200G NICs: 185 Gb/s = 23.1 GB/s.
    "a100": Profile("a100", gemm_tflops=225.0, allreduce_intra_gbps=228.0, allreduce_inter_gbps=23.0,
                    p2p_gbps=23.1, h2d_gbps=24.0, **_GPU),
    "cpu": Profile("cpu", gemm_dtype="float32", gemm_size=768, gemm_tflops=0.005, allreduce_intra_gbps=0.05,
                   allreduce_inter_gbps=0.05, p2p_gbps=0.1, h2d_gbps=None, read_gbps=0.05, message_bytes=4 * MiB,
                   reps=20, budget_s=0.05, min_host_memory_gb=1.0, compute_outlier_fraction=0.25,
                   comm_outlier_fraction=0.5, serial=True,
                   gemm_rounds=15, comm_rounds=5, gemm_turn_reps=2),
}


def guess_profile(device_name: Optional[str]) -> tuple[str, Optional[str]]:
    """Profile name for a device (None: CPU), and a note when the guess is only a fallback."""
    if device_name is None:
        return "cpu", None
    upper = device_name.upper()
    if any(k in upper for k in ("H100", "H200", "H800", "GH200")):
        return "h100", None
    if any(k in upper for k in ("A100", "A800")):
        return "a100", None
    return "a100", f"unknown device {device_name!r}: using the a100 floors; pass --profile to choose"
