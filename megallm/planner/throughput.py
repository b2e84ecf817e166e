"""FLOPs, pipeline bubble, communication volume and a predicted iteration time.

The time model is deliberately simple and every number it rests on is in `Assumptions` (printed
with each plan): compute runs at a stated fraction of the device's peak, communication at the
bus bandwidths of devices.py, and only what the schedule cannot hide is added.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megallm.config import Config, layer_parameter_count, parameter_count
from megallm.planner.devices import Device, GiB
from megallm.planner.layout import Layout


@dataclass(frozen=True)
class Assumptions:
    # Fraction of peak FLOP/s the model's kernels reach between communications. An 8192^3 bf16
    # GEMM reaches 750-800 of 989 TFLOP/s on a healthy H100 (76-81%, docs/references.md#performance); per-rank
    # GEMMs under tensor parallelism are smaller, and attention, norms, RoPE and SwiGLU run below
    # GEMM speed. Megatron's published end-to-end 52-55% MFU includes bubbles and communication.
    compute_efficiency: float = 0.6
    # Share of tensor-parallel all-reduce time hidden behind compute. megallm's TP collectives are
    # synchronous (no userbuffer overlap), so none.
    tp_overlap: float = 0.0
    # Bytes a data-parallel gradient all-reduce moves per parameter (fp32 gradients, both modes).
    grad_reduce_bytes: int = 4
    # Memory the framework holds besides model states and activations: CUDA context, NCCL
    # communicators and buffers, cuBLAS/flash workspaces, allocator fragmentation (GPU); the
    # Python interpreter with torch and megatron-core loaded (CPU, per rank).
    gpu_runtime_bytes: int = 3 * GiB
    cpu_runtime_bytes: int = GiB // 2
    # A plan that fits with less than this share of device memory to spare is called tight.
    tight_margin: float = 0.05

    def runtime_bytes(self, device: Device) -> int:
        return self.gpu_runtime_bytes if device.kind == "cuda" else self.cpu_runtime_bytes

    def to_dict(self) -> dict:
        return asdict(self)


# Bytes the optimizer step reads and writes per (unsharded) parameter: Adam reads gradient, m, v
# and the master weight, writes m, v and the master weight, and (bf16) the bf16 weight copy.
OPTIMIZER_STEP_BYTES = {"bf16": 30, "fp32": 28}


# ------------------------------------------------------------------------------------------------
# FLOPs


def model_flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token, 6N + 12*L*h*s (forward 2N + backward 4N for the matrix multiplies,
    plus QK^T and attention-times-V: 2 x 2sh forward per layer, x3 with backward; causal masking
    is not discounted, as is the MFU convention). N counts parameters that take part in a matrix
    multiply: the untied input embedding is a lookup and is left out. This reproduces NeMo's
    LLaMA2-70B figure (759 TFLOP/s per GPU at 1707 tokens/s per GPU: 444.6 GFLOP per token)."""
    m, s = cfg.model, cfg.training.seq_length
    n = parameter_count(m) - (m.vocab_size * m.hidden_size if m.untie_embeddings_and_output_weights else 0)
    return 6 * n + 12 * m.num_layers * m.hidden_size * s


def layer_flops_per_token(cfg: Config, recompute: str, modules: tuple = ()) -> float:
    """One decoder layer's FLOPs per token as executed: the model FLOPs plus what recompute
    repeats (full: the layer's forward, 2N_layer + 4hs; selective: the MLP's GEMMs, 2 x 3hf, when
    `mlp` is among the modules; norms and the SwiGLU activation are elementwise, no GEMM FLOPs;
    flash attention's backward recomputes the scores anyway, counted in efficiency)."""
    m, s = cfg.model, cfg.training.seq_length
    n, attention = layer_parameter_count(m), 4 * m.hidden_size * s
    mlp = 2 * 3 * m.hidden_size * m.ffn_hidden_size if "mlp" in modules else 0
    extra = {"none": 0, "selective": mlp, "full": 2 * n + attention}[recompute]
    return 6 * n + 3 * attention + extra


def stage_flops_per_token(cfg: Config, layout: Layout, num_layers: int, has_head: bool) -> float:
    """A pipeline rank's executed FLOPs per token of its micro-batches, over all its TP ranks."""
    head = 6 * cfg.padded_vocab_size * cfg.model.hidden_size if has_head else 0
    return num_layers * layer_flops_per_token(cfg, layout.recompute, layout.recompute_modules) + head


def bubble_fraction(layout: Layout) -> float:
    """Idle share of the pipeline relative to the ideal time: (p - 1)/m for 1F1B and GPipe,
    (p - 1)/(v*m) with v interleaved chunks (Narayanan et al. 2021)."""
    if layout.pp == 1:
        return 0.0
    return (layout.pp - 1) / (layout.vpp * layout.num_micro_batches)


# ------------------------------------------------------------------------------------------------
# Communication: bytes one GPU sends per iteration


def ring_bytes_sent(message_bytes: float, ranks: int, kind: str = "all_reduce") -> float:
    """A ring all-reduce of M bytes over n ranks sends 2(n-1)/n * M per rank; reduce-scatter and
    all-gather send (n-1)/n * M each (the all-reduce is the two in sequence)."""
    if ranks <= 1:
        return 0.0
    factor = 2 if kind == "all_reduce" else 1
    return factor * (ranks - 1) / ranks * message_bytes


def tensor_parallel_bytes(cfg: Config, layout: Layout, num_layers: int, first: bool, last: bool) -> float:
    """Per layer and micro-batch: 2 all-reduces of the [s, b, h] block output in forward (after
    attention and after the MLP) and 2 in backward (the gradients entering the two column-parallel
    GEMMs); full recompute repeats the forward's 2. Sequence parallelism replaces each all-reduce
    with an all-gather + reduce-scatter of the same total volume. The first stage adds the vocab-
    parallel embedding's forward all-reduce, the last the output layer's backward one."""
    message = layout.seq_length * layout.micro_batch_size * cfg.model.hidden_size * layout.act_bytes
    per_layer = 4 + (2 if layout.recompute == "full" else 0)
    count = num_layers * per_layer + first + last
    return layout.num_micro_batches * count * ring_bytes_sent(message, layout.tp)


def pipeline_bytes(cfg: Config, layout: Layout) -> float:
    """Each chunk of each micro-batch sends its output forward and receives (then sends on) its
    input's gradient backward: 2 messages of [s, b, h] (split by t under sequence parallelism).
    Counted for a middle rank, the busiest."""
    if layout.pp == 1:
        return 0.0
    split = layout.tp if layout.sequence_parallel else 1
    message = layout.seq_length * layout.micro_batch_size * cfg.model.hidden_size * layout.act_bytes / split
    return 2 * layout.vpp * layout.num_micro_batches * message


def data_parallel_bytes(parameters_per_gpu: int, layout: Layout, assumptions: Assumptions) -> dict[str, float]:
    """Gradients: one all-reduce per iteration of the fp32 main grads, or with the distributed
    optimizer a reduce-scatter (half the volume), in both precisions as the engine does. The
    distributed optimizer then all-gathers the updated weights (bf16: 2 bytes, fp32: 4)."""
    d = layout.dp
    grads = parameters_per_gpu * assumptions.grad_reduce_bytes
    reduce = ring_bytes_sent(grads, d, "reduce_scatter" if layout.distributed_optimizer else "all_reduce")
    gather = 0.0
    if layout.distributed_optimizer:
        weight_bytes = 2 if layout.precision == "bf16" else 4
        gather = ring_bytes_sent(parameters_per_gpu * weight_bytes, d, "all_gather")
    return {"gradients": reduce, "weights": gather}


def group_bandwidth(device: Device, span: int, gpus_per_node: int) -> float:
    """A group whose ranks lie within `span` consecutive global ranks stays inside a node when
    span <= gpus_per_node (Megatron's rank order: tp fastest, then dp, then pp)."""
    return device.intra_node_busbw if span <= gpus_per_node else device.inter_node_busbw


# ------------------------------------------------------------------------------------------------
# Time


def iteration_time(cfg: Config, layout: Layout, device: Device, gpus_per_node: int, stages: list,
                   assumptions: Assumptions) -> dict[str, float]:
    """Seconds per iteration, by part. `stages`: StageParameters of every pipeline rank.

    per micro-batch  t_mb = max over stages of (compute + exposed TP) + exposed PP p2p
    pipeline         t_mb * (m + (p - 1)/v)  =  m * t_mb * (1 + bubble)
    data parallel    gradient reduction (beyond the last backward with overlap), + ZeRO all-gather
    optimizer        the Adam step, bound by memory bandwidth
    """
    m, tokens = layout.num_micro_batches, layout.seq_length * layout.micro_batch_size
    peak = device.peak_flops(layout.precision) * assumptions.compute_efficiency
    tp_bw = group_bandwidth(device, layout.tp, gpus_per_node)
    dp_bw = group_bandwidth(device, layout.tp * layout.dp, gpus_per_node)
    pp_bw = group_bandwidth(device, layout.world_size, gpus_per_node)
    per_stage = []
    for st in stages:
        compute = tokens * stage_flops_per_token(cfg, layout, len(st.layers), st.has_head) / layout.tp / peak
        tp_bytes = tensor_parallel_bytes(cfg, layout, len(st.layers), st.has_embedding, st.has_head) / m
        per_stage.append((compute, tp_bytes / tp_bw * (1 - assumptions.tp_overlap)))
    compute_mb, tp_mb = max(per_stage, key=lambda c: c[0] + c[1])
    pp_mb = pipeline_bytes(cfg, layout) / m / pp_bw
    micro_batch = compute_mb + tp_mb + pp_mb
    bubble = micro_batch * (layout.pp - 1) / layout.vpp
    params = max(st.parameters_per_gpu for st in stages)
    dp = data_parallel_bytes(params, layout, assumptions)
    # Without --overlap-grad-reduce the reduction starts after the whole backward; with it, it
    # runs beside the last micro-batch's backward (2/3 of its compute).
    hidden = 2 / 3 * compute_mb if layout.overlap_grad_reduce else 0.0
    dp_exposed = max(0.0, dp["gradients"] / dp_bw - hidden) + dp["weights"] / dp_bw
    shard = layout.dp if layout.distributed_optimizer else 1
    optimizer = params / shard * OPTIMIZER_STEP_BYTES[layout.precision] / device.memory_bandwidth
    parts = {
        "compute": compute_mb * m,
        "bubble": bubble,
        "tensor_parallel": tp_mb * m,
        "pipeline_p2p": pp_mb * m,
        "data_parallel": dp_exposed,
        "optimizer": optimizer,
    }
    parts["total"] = micro_batch * m + bubble + dp_exposed + optimizer
    return parts
