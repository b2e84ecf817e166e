"""One layout, planned: memory per GPU with a verdict, bubble, FLOPs, communication, time, MFU.

    from megallm.planner import plan
    p = plan(cfg, world_size=64, device="h100-80gb", recompute="selective")
    p.fits, p.margin_bytes, p.mfu, p.to_dict()
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from megallm.config import Config, parameter_count
from megallm.planner import memory, throughput
from megallm.planner.devices import Device, GiB, get_device
from megallm.planner.layout import Layout, PlanError, make_layout
from megallm.planner.throughput import Assumptions

# How the time model works, printed with every plan next to the numbers in Assumptions.
TIME_MODEL = (
    "compute: executed FLOPs (6N + 12Lhs per token, plus recompute) at compute_efficiency x peak",
    "pipeline: the slowest stage sets the pace; bubble (p-1)/(v*m) of the ideal time",
    "TP all-reduces are on the critical path (less tp_overlap); PP sends are not overlapped",
    "DP gradient reduction follows the whole backward (with --overlap-grad-reduce it runs beside the "
    "last micro-batch's backward); ZeRO-1's weight all-gather hides behind nothing",
    "bandwidths: all-reduce bus bandwidth inside a node, per-NIC bandwidth across nodes",
)


@dataclass
class StagePlan:
    pipeline_rank: int
    layers: str  # "0-9" or "0-4,40-44" with interleaving
    has_embedding: bool
    has_head: bool
    parameters: int  # per GPU
    chunks_in_flight: int  # micro-batch x chunk forwards held at the peak
    model_state: dict[str, int]
    activations: dict[str, float]
    runtime_bytes: int
    total_bytes: int


@dataclass
class Plan:
    device: str
    device_memory_bytes: int  # per rank (a CPU host's memory is shared by its ranks)
    layout: Layout
    gpus_per_node: int
    parameters: int  # the whole model, unpadded vocabulary
    stages: list[StagePlan]
    peak_stage: int  # the pipeline rank with the largest total; its figures follow
    model_state_bytes: int
    activation_bytes: int
    total_bytes: int
    margin_bytes: int  # device memory - total; negative: does not fit
    fits: bool
    verdict: str  # fits | tight | does not fit
    bubble_fraction: float
    flops_per_iteration: float  # model FLOPs (the MFU numerator)
    hardware_flops_per_iteration: float  # with recompute
    comm_bytes_per_gpu: dict[str, float]  # tensor_parallel, pipeline_parallel, data_parallel
    time_breakdown_s: dict[str, float]
    iteration_time_s: float
    tokens_per_s: float
    tokens_per_s_per_gpu: float
    mfu: float
    assumptions: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _layer_ranges(layers: list[int]) -> str:
    ranges, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [None]):
        if cur != prev + 1:
            ranges.append(f"{start}-{prev}" if prev != start else str(start))
            start = cur
    return ",".join(ranges)


def plan_layout(cfg: Config, layout: Layout, device: Device, gpus_per_node: int,
                assumptions: Assumptions) -> Plan:
    stage_params = memory.stage_parameters(cfg, layout)
    runtime = assumptions.runtime_bytes(device)
    stages = []
    for st in stage_params:
        states = memory.model_state_bytes(st.parameters_per_gpu, layout)
        acts = memory.stage_activation_bytes(cfg, layout, st.pipeline_rank)
        stages.append(StagePlan(
            pipeline_rank=st.pipeline_rank, layers=_layer_ranges(st.layers), has_embedding=st.has_embedding,
            has_head=st.has_head, parameters=st.parameters_per_gpu,
            chunks_in_flight=memory.chunks_in_flight(layout, st.pipeline_rank), model_state=states,
            activations=acts, runtime_bytes=runtime, total_bytes=int(states["total"] + acts["total"] + runtime)))
    peak = max(stages, key=lambda s: s.total_bytes)
    memory_bytes = device.memory_bytes
    if device.shared:
        memory_bytes //= min(layout.world_size, gpus_per_node)
    margin = memory_bytes - peak.total_bytes
    fits = margin >= 0
    verdict = "does not fit" if not fits else ("tight" if margin < assumptions.tight_margin * memory_bytes else "fits")

    tokens = layout.seq_length * cfg.training.global_batch_size
    flops = throughput.model_flops_per_token(cfg) * tokens
    hw_flops = sum(throughput.stage_flops_per_token(cfg, layout, len(st.layers), st.has_head)
                   for st in stage_params) * tokens
    times = throughput.iteration_time(cfg, layout, device, gpus_per_node, stage_params, assumptions)
    seconds = times["total"]
    dp = throughput.data_parallel_bytes(max(s.parameters_per_gpu for s in stage_params), layout, assumptions)
    comm = {
        "tensor_parallel": max(throughput.tensor_parallel_bytes(cfg, layout, len(s.layers), s.has_embedding,
                                                                 s.has_head) for s in stage_params),
        "pipeline_parallel": throughput.pipeline_bytes(cfg, layout),
        "data_parallel": dp["gradients"] + dp["weights"],
    }
    return Plan(
        device=device.name, device_memory_bytes=memory_bytes, layout=layout, gpus_per_node=gpus_per_node,
        parameters=parameter_count(cfg.model), stages=stages, peak_stage=peak.pipeline_rank,
        model_state_bytes=peak.model_state["total"], activation_bytes=int(peak.activations["total"]),
        total_bytes=peak.total_bytes, margin_bytes=margin, fits=fits, verdict=verdict,
        bubble_fraction=throughput.bubble_fraction(layout), flops_per_iteration=flops,
        hardware_flops_per_iteration=hw_flops, comm_bytes_per_gpu=comm, time_breakdown_s=times,
        iteration_time_s=seconds, tokens_per_s=tokens / seconds,
        tokens_per_s_per_gpu=tokens / seconds / layout.world_size,
        mfu=flops / (layout.world_size * device.peak_flops(layout.precision) * seconds),
        assumptions={**assumptions.to_dict(), "time_model": list(TIME_MODEL),
                     "peak_flops": device.peak_flops(layout.precision),
                     "intra_node_busbw": device.intra_node_busbw, "inter_node_busbw": device.inter_node_busbw},
    )


def plan(cfg: Config, world_size: int, device: str = "h100-80gb", recompute: Optional[str] = None,
         sequence_parallel: Optional[bool] = None, precision: Optional[str] = None, flash_attention: bool = True,
         gpus_per_node: Optional[int] = None, assumptions: Optional[Assumptions] = None) -> Plan:
    """Plan the config's own layout on `world_size` devices, with the config's sequence parallelism
    and recompute unless given here. Raises PlanError (a ValueError) for a layout that would not start.
    gpus_per_node defaults to 8 on GPUs and world_size on the CPU."""
    dev = get_device(device)
    layout = make_layout(cfg, world_size, dev, recompute, sequence_parallel, precision, flash_attention)
    if gpus_per_node is None:
        gpus_per_node = world_size if dev.kind == "cpu" else min(8, world_size)
    return plan_layout(cfg, layout, dev, gpus_per_node, assumptions or Assumptions())


# ------------------------------------------------------------------------------------------------
# What the launcher and preflight ask


def _as_run(cfg: Config) -> dict:
    """The choices the run itself will make: the config's recompute and sequence parallelism,
    which `plan` reads when none are given."""
    return {}


def _cuda_device() -> str:
    import torch

    return "h100-80gb" if torch.cuda.is_available() else "cpu"


def memory_need_bytes(cfg: Config, world_size: int, device: Optional[str] = None) -> int:
    """Peak bytes per device of the run as configured (the busiest pipeline stage), runtime
    overhead included. device only picks the precision ('auto' params_dtype) and the runtime
    overhead; None: a GPU if torch sees one, else the CPU."""
    return plan(cfg, world_size, device or _cuda_device(), **_as_run(cfg)).total_bytes


def fit_warning(cfg: Config, world_size: int, device_memory_bytes: int, device: Optional[str] = None) -> Optional[str]:
    """A one-line warning when the run as configured will not fit (or fits with under 5% spare),
    else None. The launcher does not use it: its check_memory prints the full plan and flags_that_fit."""
    p = plan(cfg, world_size, device or _cuda_device(), **_as_run(cfg))
    margin = device_memory_bytes - p.total_bytes
    if margin >= p.assumptions["tight_margin"] * device_memory_bytes:
        return None
    st = p.stages[p.peak_stage]
    need = (f"pipeline rank {st.pipeline_rank} needs about {p.total_bytes / GiB:.1f} GiB per device "
            f"(model states {st.model_state['total'] / GiB:.1f}, activations {st.activations['total'] / GiB:.1f}, "
            f"runtime {st.runtime_bytes / GiB:.1f})")
    if margin < 0:
        return (f"layout will not fit: {need}, the device has {device_memory_bytes / GiB:.1f} GiB; "
                f"see `python tools/plan.py --search` (recompute, ZeRO-1, more tp/pp, smaller micro batch)")
    return (f"layout fits with under {p.assumptions['tight_margin']:.0%} to spare: "
            f"{need} of {device_memory_bytes / GiB:.1f} GiB")


def predicted_rank_memory(cfg: Config, world_size: int, rank: int) -> dict:
    """What one rank of a CPU run (fp32, or bf16 with --bf16 / params_dtype bf16; megallm's
    data-parallel engine; the config's sequence parallelism and recompute) holds, for comparison
    with its measured memory. Rank order is Megatron's: rank = tp_rank + tp*(dp_rank + dp*pp_rank)."""
    bf16 = cfg.training.bf16 or cfg.training.params_dtype == "bf16"
    p = plan(cfg, world_size, "cpu", precision="bf16" if bf16 else "fp32", **_as_run(cfg))
    layout = p.layout
    pp_rank = rank // (layout.tp * layout.dp)
    st = p.stages[pp_rank]
    return {
        "pipeline_rank": pp_rank,
        "parameters": st.parameters,
        "model_state_bytes": st.model_state["total"],
        "activation_bytes": int(st.activations["total"]),
        "model_state": st.model_state,
        "activations": st.activations,
        "chunks_in_flight": st.chunks_in_flight,
    }


# What would make a layout fit: the engine's memory features, cheapest first, then their pairs.
REMEDIES = (
    ("--sequence-parallel", {"sequence_parallel": True}),
    ("--recompute-granularity selective", {"recompute_granularity": "selective"}),
    ("--use-distributed-optimizer", {"use_distributed_optimizer": True}),
    ("--recompute-granularity full --recompute-method uniform --recompute-num-layers 1",
     {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}),
    ("--micro-batch-size 1", {"micro_batch_size": 1}),
)


def flags_that_fit(cfg: Config, world_size: int, device: str, gpus_per_node: Optional[int] = None,
                   limit: int = 3) -> list[tuple[str, Plan]]:
    """Up to `limit` sets of flags (one remedy, else two) that make this run fit the device,
    with their plans: what the launcher suggests when it refuses a layout."""
    import copy
    import itertools

    from megallm.config import apply_overrides

    def applies(overrides: dict) -> bool:
        return any(getattr(getattr(cfg, sec), k, None) != v for k, v in overrides.items()
                   for sec in ("parallel", "training") if hasattr(getattr(cfg, sec), k))

    found = []
    for n in (1, 2):
        for combo in itertools.combinations(REMEDIES, n):
            overrides = {k: v for _, o in combo for k, v in o.items()}
            if not all(applies(o) for _, o in combo) or ("sequence_parallel" in overrides and
                                                        cfg.parallel.tensor_model_parallel_size == 1):
                continue
            c = apply_overrides(copy.deepcopy(cfg), overrides)
            try:
                p = plan(c, world_size, device, gpus_per_node=gpus_per_node)
            except PlanError:
                continue
            if p.fits:
                found.append((" ".join(flag for flag, _ in combo), p))
                if len(found) == limit:
                    return found
        if found:
            return found
    return found
