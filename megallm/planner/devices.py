"""Accelerators the planner knows: memory, peak dense FLOP/s, and the bandwidths it times with.

Memory is the total the driver reports (nvidia-smi / torch.cuda.get_device_properties), not the
marketing figure. Peak FLOP/s are the vendor's dense (no 2:4 sparsity) numbers. Bandwidths are
all-reduce *bus* bandwidths as nccl-tests report them, so an all-reduce of M bytes over n ranks
takes M * 2(n-1)/n / busbw; the intra-node and per-NIC figures are the preflight's floors
(docs/references.md#cluster-thresholds: a node that measures below them is sent back), i.e. what a
healthy node gets.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

GiB = 2**30
MiB = 2**20


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    memory_bytes: int
    peak_bf16_flops: float  # dense, per device
    peak_fp32_flops: float  # dense, no tensor cores (what fp32 GEMMs get without TF32)
    memory_bandwidth: float  # bytes/s, HBM (the optimizer step is bound by it)
    intra_node_busbw: float  # bytes/s, all-reduce bus bandwidth inside a node
    inter_node_busbw: float  # bytes/s per device, all-reduce bus bandwidth across nodes
    kind: str = "cuda"  # cuda | cpu
    # Ranks that share memory_bytes: 1 for a GPU; every rank on the host for the CPU.
    shared: bool = False

    def peak_flops(self, precision: str) -> float:
        return self.peak_bf16_flops if precision == "bf16" else self.peak_fp32_flops

    def to_dict(self) -> dict:
        return asdict(self)


def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a small host
        return 16 * GiB


H100_IB = 46e9  # 8 x 400G InfiniBand per node, one NIC per GPU: 46-48 GB/s busbw per NIC
A100_IB = 23e9  # 8 x 200G per node: >= 185 Gb/s per NIC

DEVICES: dict[str, Device] = {
    d.name: d
    for d in [
        Device("h100-80gb", "NVIDIA H100 SXM5 80GB (HBM3), NVLink 4 + NVSwitch",
               81559 * MiB, 989.4e12, 66.9e12, 3.35e12, 460e9, H100_IB),
        # H100 NVL is a PCIe card whose NVLink bridges join pairs only: an 8-GPU all-reduce runs
        # over PCIe Gen5 (64 GB/s raw); 40 GB/s busbw is an assumption, not a measured threshold.
        Device("h100-94gb", "NVIDIA H100 NVL 94GB (PCIe, NVLink bridge pairs)",
               95830 * MiB, 835.5e12, 60.0e12, 3.9e12, 40e9, H100_IB),
        Device("h200-141gb", "NVIDIA H200 SXM 141GB (HBM3e), NVLink 4 + NVSwitch",
               143771 * MiB, 989.4e12, 66.9e12, 4.8e12, 460e9, H100_IB),
        Device("a100-80gb", "NVIDIA A100 SXM4 80GB, NVLink 3 + NVSwitch",
               81920 * MiB, 312e12, 19.5e12, 2.039e12, 228e9, A100_IB),
        Device("a100-40gb", "NVIDIA A100 SXM4 40GB, NVLink 3 + NVSwitch",
               40960 * MiB, 312e12, 19.5e12, 1.555e12, 228e9, A100_IB),
        # One rank per core on a small host. FLOP/s: a core with AVX2 FMA at ~3 GHz peaks near
        # 100 GFLOP/s fp32; torch reaches about half of it on GEMMs (rough, only for run time).
        # gloo over loopback moves ~2 GB/s. Memory is the host's, shared by all its ranks.
        Device("cpu", "host CPU (one rank per core, gloo)", _host_memory_bytes(), 100e9, 100e9, 10e9,
               2e9, 1e9, kind="cpu", shared=True),
    ]
}


def get_device(name: str) -> Device:
    try:
        return DEVICES[name]
    except KeyError:
        raise ValueError(f"unknown device {name!r}; known: {', '.join(DEVICES)}") from None


def detect_device(name: str, memory_bytes: int) -> str | None:
    """The planner's device for what torch.cuda.get_device_properties reports (its name and total
    memory), or None for a GPU the planner does not know. Memory tells the variants apart: an
    'NVIDIA H100 NVL' reports ~94 GB, 'NVIDIA H100 80GB HBM3' ~80 GB."""
    upper = name.upper()
    if "H200" in upper:
        return "h200-141gb"
    if "H100" in upper:
        return "h100-94gb" if memory_bytes > 88 * GiB else "h100-80gb"
    if "A100" in upper:
        return "a100-80gb" if memory_bytes > 60 * GiB else "a100-40gb"
    return None
