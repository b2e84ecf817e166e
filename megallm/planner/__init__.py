"""Memory and throughput planner: will a layout fit, and how fast will it go.

    plan(cfg, world_size, device="h100-80gb", recompute="selective") -> Plan
    search(cfg, nodes, gpus_per_node, device) -> [Plan], layouts that fit, fastest first
    flags_that_fit(cfg, world_size, device) -> [(flags, Plan)], what the launcher suggests when it refuses
    memory_need_bytes(cfg, world_size) / fit_warning(cfg, world_size, device_memory_bytes)
    predicted_rank_memory(cfg, world_size, rank)   # a CPU run's rank, for measured comparisons
    detect_device(name, memory_bytes)              # the planner's device for a CUDA GPU, or None

Pure arithmetic on the config: nothing here imports torch (fit_warning asks torch only when no
device is named) or touches a process group. See docs/planner.md.
"""

from megallm.planner.devices import DEVICES, Device, detect_device, get_device
from megallm.planner.layout import RECOMPUTE, Layout, PlanError
from megallm.planner.plan import (
    Plan,
    StagePlan,
    fit_warning,
    flags_that_fit,
    memory_need_bytes,
    plan,
    predicted_rank_memory,
)
from megallm.planner.search import search
from megallm.planner.throughput import Assumptions

__all__ = [
    "DEVICES", "RECOMPUTE", "Assumptions", "Device", "Layout", "Plan", "PlanError", "StagePlan", "detect_device",
    "fit_warning", "flags_that_fit", "get_device", "memory_need_bytes", "plan", "predicted_rank_memory", "search",
]
