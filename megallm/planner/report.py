"""Plain-text rendering of plans for tools/plan.py (fixed-width, so logs and diffs read well)."""

from __future__ import annotations

from megallm.planner.devices import GiB
from megallm.planner.plan import Plan


def _gib(n: float) -> str:
    return f"{n / GiB:8.2f} GiB" if n >= GiB / 8 or n == 0 else f"{n / 2**20:8.2f} MiB"


def _layout_line(p: Plan) -> str:
    L = p.layout
    return (f"tp {L.tp} x pp {L.pp} x dp {L.dp} (vpp {L.vpp}, {L.schedule}) = {L.world_size} devices, "
            f"{p.gpus_per_node} per node; micro batch {L.micro_batch_size} x {L.num_micro_batches} micro-batches, "
            f"seq {L.seq_length}; recompute {L.recompute}, sequence parallel {'on' if L.sequence_parallel else 'off'}, "
            f"ZeRO-1 {'on' if L.distributed_optimizer else 'off'}, {L.precision}, "
            f"{'flash' if L.flash_attention else 'math'} attention")


def render_plan(p: Plan) -> str:
    lines = [f"layout   {_layout_line(p)}", f"model    {p.parameters:,} parameters", ""]
    lines.append("stage  layers               params/GPU  in flight  model states   activations         total")
    for st in p.stages:
        tag = ("E" if st.has_embedding else " ") + ("H" if st.has_head else " ")
        lines.append(f"{st.pipeline_rank:5d}{tag} {st.layers:<14} {st.parameters:16,}  {st.chunks_in_flight:9d}  "
                     f"{_gib(st.model_state['total'])}  {_gib(st.activations['total'])}  {_gib(st.total_bytes)}")
    lines.append("       E: embedding, H: final norm + output layer; in flight: micro-batch x chunk forwards held")
    peak = p.stages[p.peak_stage]
    ms, acts = peak.model_state, peak.activations
    lines += ["", f"memory per device, pipeline rank {p.peak_stage} (the largest):"]
    for name in ("weights", "gradients", "master_weights", "optimizer"):
        if ms[name]:
            lines.append(f"  {name:<22}{_gib(ms[name])}")
    for name in ("layers", "recompute", "pipeline", "inputs", "head"):
        if acts[name]:
            lines.append(f"  activations: {name:<9}{_gib(acts[name])}")
    lines.append(f"  {'runtime (assumed)':<22}{_gib(peak.runtime_bytes)}")
    lines.append(f"  {'total':<22}{_gib(p.total_bytes)}  of {p.device_memory_bytes / GiB:.2f} GiB ({p.device})")
    lines.append(f"  verdict: {p.verdict.upper()}, margin {p.margin_bytes / GiB:+.2f} GiB")
    c, t = p.comm_bytes_per_gpu, p.time_breakdown_s
    lines += [
        "",
        f"pipeline bubble   {p.bubble_fraction:.3f} of the ideal time",
        f"FLOPs/iteration   {p.flops_per_iteration:.4g} model, {p.hardware_flops_per_iteration:.4g} executed",
        f"sent per GPU/iter TP {c['tensor_parallel'] / GiB:.2f} GiB, PP {c['pipeline_parallel'] / GiB:.2f} GiB, "
        f"DP {c['data_parallel'] / GiB:.2f} GiB",
        f"iteration time    {p.iteration_time_s:.3f} s = " + " + ".join(
            f"{k.replace('_', ' ')} {v:.3f}" for k, v in t.items() if k != "total"),
        f"throughput        {p.tokens_per_s:,.0f} tokens/s, {p.tokens_per_s_per_gpu:,.0f} tokens/s per device, "
        f"MFU {p.mfu:.1%}",
        "",
        "assumptions",
        f"  peak {p.assumptions['peak_flops'] / 1e12:.1f} TFLOP/s ({p.layout.precision}) x compute efficiency "
        f"{p.assumptions['compute_efficiency']}; all-reduce busbw {p.assumptions['intra_node_busbw'] / 1e9:.0f} GB/s "
        f"in a node, {p.assumptions['inter_node_busbw'] / 1e9:.0f} GB/s per device across nodes; "
        f"tp overlap {p.assumptions['tp_overlap']}",
    ]
    lines += [f"  {note}" for note in p.assumptions["time_model"]]
    return "\n".join(lines)


def render_search(plans: list[Plan], top: int) -> str:
    if not plans:
        return "no layout fits"
    first = plans[0]
    lines = [f"{len(plans)} layouts fit {first.parameters:,} parameters on {first.layout.world_size} x {first.device} "
             f"({first.gpus_per_node} per node), fastest first; assumptions as printed with a single plan",
             " #  tp  pp vpp  dp  mbs recompute  ZeRO  GiB/device  margin  verdict  tokens/s/dev    MFU  bubble"]
    for i, p in enumerate(plans[:top], 1):
        L = p.layout
        lines.append(f"{i:2d} {L.tp:3d} {L.pp:3d} {L.vpp:3d} {L.dp:3d} {L.micro_batch_size:4d} {L.recompute:<10} "
                     f"{'on' if L.distributed_optimizer else 'off':>4} {p.total_bytes / GiB:11.1f} "
                     f"{p.margin_bytes / GiB:+7.1f}  {p.verdict:<7} {p.tokens_per_s_per_gpu:13,.0f} "
                     f"{p.mfu:6.1%} {p.bubble_fraction:7.3f}")
    if len(plans) > top:
        lines.append(f"   ... {len(plans) - top} more that fit (--top N shows more)")
    return "\n".join(lines)
