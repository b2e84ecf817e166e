"""What a node is: software versions, cores and memory, devices and their NVML health.

Gathered once per node (by its local rank 0) and sent to node 0 with the registration, so version
and device mismatches are known before any process group exists.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Optional

import torch

# Distribution names as pip knows them; several ship under more than one name.
PACKAGES = {
    "megatron-core": ("megatron-core", "megatron_core"),
    "transformer-engine": ("transformer-engine", "transformer_engine", "transformer-engine-cu12"),
    "apex": ("apex",),
    "megallm": ("megallm",),
}
# Test hook: "pkg=version[,pkg=version]" replaces what this node reports (fault injection, docs).
FAKE_VERSION_ENV = "MEGALLM_PREFLIGHT_FAKE_VERSION"


def dist_version(*names: str) -> Optional[str]:
    """An installed distribution's version from its metadata (nothing is imported), else None."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _nccl_version() -> Optional[str]:
    if not torch.cuda.is_available():
        return None
    try:
        v = torch.cuda.nccl.version()
        return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception:  # a build without NCCL
        return None


def git_commit(repo: Path = Path(__file__).resolve().parents[2]) -> Optional[str]:
    """HEAD of the megallm checkout this code runs from; None when it is not a checkout."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def parse_fake_versions(text: str) -> dict[str, str]:
    fake = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, version = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{FAKE_VERSION_ENV}={text!r}: expected pkg=version[,pkg=version]")
        fake[name.strip()] = version.strip()
    return fake


def versions(env: Optional[dict] = None) -> dict[str, Optional[str]]:
    env = os.environ if env is None else env
    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": _nccl_version(),
        **{pkg: dist_version(*names) for pkg, names in PACKAGES.items()},
        "git_commit": git_commit(),
    }
    return found | parse_fake_versions(env.get(FAKE_VERSION_ENV, ""))


def mem_available(meminfo: str = "/proc/meminfo") -> int:
    """MemAvailable in bytes: what the kernel can give without swapping (free + reclaimable cache)."""
    for line in Path(meminfo).read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"{meminfo}: no MemAvailable line")


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0))


def host_facts(cores: Optional[int] = None) -> dict:
    """cores: the node's cores as the launcher gave them (before a rank pins itself to its share)."""
    return {"hostname": socket.gethostname(), "cpu_cores": cores or cpu_cores(), "mem_available": mem_available(),
            "device_count": torch.cuda.device_count() if torch.cuda.is_available() else None,
            "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _throttle_reasons(nvml, handle) -> list[str]:
    """Clock slowdowns that cost throughput; idle and application-clock settings are not faults."""
    try:
        mask = nvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle)
    except nvml.NVMLError:
        return []
    reasons = {"HwSlowdown": 0x8, "SwThermalSlowdown": 0x20, "HwThermalSlowdown": 0x40, "HwPowerBrakeSlowdown": 0x80}
    return [name for name, bit in reasons.items() if mask & bit]


def _xid_lines() -> list[str]:
    """NVIDIA Xid lines in the kernel log (readable as root); NVML only reports Xids as live events."""
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.splitlines() if "NVRM: Xid" in line][-5:]


def _xid_of_device(lines: list[str], bus_id) -> list[str]:
    """Xid lines name the device by PCI address ("PCI:0000:3b:00"); NVML's busId is "00000000:3B:00.0"."""
    bus = (bus_id.decode() if isinstance(bus_id, bytes) else bus_id).lower()
    short = bus[-12:-2]  # "0000:3b:00"
    return [line for line in lines if short in line.lower()]


def gpu_health() -> Optional[list[dict]]:
    """Per device ECC, HBM row remapping and throttling from NVML; None without NVML or GPUs."""
    if not torch.cuda.is_available():
        return None
    try:
        import pynvml as nvml  # the nvidia-ml-py distribution

        nvml.nvmlInit()
    except Exception:
        return None
    xid = _xid_lines()
    devices = []
    try:
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            d = {"index": i, "name": nvml.nvmlDeviceGetName(h), "throttle": _throttle_reasons(nvml, h),
                 "xid": _xid_of_device(xid, nvml.nvmlDeviceGetPciInfo(h).busId)}
            try:
                d["ecc_uncorrected"] = nvml.nvmlDeviceGetTotalEccErrors(
                    h, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC)
            except nvml.NVMLError:
                d["ecc_uncorrected"] = None  # ECC off or not supported
            try:
                _, _, pending, failure = nvml.nvmlDeviceGetRemappedRows(h)
                d["remap_pending"], d["remap_failure"] = bool(pending), bool(failure)
            except nvml.NVMLError:
                pass
            devices.append(d)
    finally:
        nvml.nvmlShutdown()
    return devices
