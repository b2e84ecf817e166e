"""Memory per GPU: parameters per pipeline stage, model states, and activations under 1F1B.

Every figure is for one GPU (one rank). Parameter counts come from megallm.config, the one place
that defines the model's shapes; this module only says how they are split and stored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megallm.config import Config, layer_parameter_count
from megallm.planner.layout import Layout

# ------------------------------------------------------------------------------------------------
# Parameters per stage


@dataclass(frozen=True)
class StageParameters:
    pipeline_rank: int
    layers: list[int]  # global layer numbers this pipeline rank holds (all its virtual chunks)
    has_embedding: bool
    has_head: bool  # final norm + output layer
    parameters: int  # the stage over all its tensor-parallel ranks
    parameters_per_gpu: int  # one tensor-parallel rank's share

    def to_dict(self) -> dict:
        return asdict(self)


def stage_parameters(cfg: Config, layout: Layout) -> list[StageParameters]:
    """Chunk c of pp*vpp holds layers [c*L/(pp*vpp), (c+1)*L/(pp*vpp)) and lives on pipeline rank
    c % pp (Megatron's interleaving), so the embedding (chunk 0) is on rank 0 and the output
    head (chunk pp*vpp-1) on rank pp-1 whatever vpp is. Tensor parallelism splits every matrix
    and the (padded) vocabulary by tp; the RMSNorm weights (2h per layer, h final) are replicated."""
    m, tp, pp, vpp = cfg.model, layout.tp, layout.pp, layout.vpp
    h, vocab = m.hidden_size, cfg.padded_vocab_size
    per_chunk = m.num_layers // (pp * vpp)
    layer, layer_norms = layer_parameter_count(m), 2 * h
    layer_per_gpu = (layer - layer_norms) // tp + layer_norms
    # megallm's last chunk always builds its own output layer (with tied embeddings and pp > 1
    # Megatron, too, keeps a copy there), so the head matrix is counted whatever the tie flag says.
    head_matrix = vocab * h
    stages = []
    for r in range(pp):
        layers = [n for c in range(r, pp * vpp, pp) for n in range(c * per_chunk, (c + 1) * per_chunk)]
        first, last = r == 0, r == pp - 1
        total = len(layers) * layer + first * vocab * h + last * (head_matrix + h)
        per_gpu = len(layers) * layer_per_gpu + first * vocab * h // tp + last * (head_matrix // tp + h)
        stages.append(StageParameters(r, layers, first, last, total, per_gpu))
    return stages


# ------------------------------------------------------------------------------------------------
# Model states


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter of each model-state component, before any ZeRO sharding, as megallm's
    engine (megallm.parallel.distributed_optimizer) holds them.

    bf16 (Megatron's mixed precision, 18 B/param): bf16 weight 2, fp32 main grad 4 (the flat grad
    buffer the data-parallel reduction works on in place, so no separate buckets), fp32 master
    weight 4, Adam m 4 and v 4. The distributed optimizer shards master + Adam over d data-parallel
    ranks: 6 + 12/d.
    fp32 (16 B/param): weight 4, main grad 4, Adam 8; the fp32 weights are their own masters.
    With the distributed optimizer: 8 + 8/d.
    The flat buffers are padded to a multiple of d elements per model chunk (under d elements,
    not counted here); p.grad exists only between a micro-batch's backward and its hook.
    """

    weights: int
    gradients: int
    master_weights: int
    optimizer: int

    @property
    def sharded(self) -> int:
        return self.master_weights + self.optimizer


STATE_BYTES = {
    "bf16": StateBytes(weights=2, gradients=4, master_weights=4, optimizer=8),
    "fp32": StateBytes(weights=4, gradients=4, master_weights=0, optimizer=8),
}


def model_state_bytes(parameters: int, layout: Layout) -> dict[str, int]:
    """Per-component bytes for `parameters` held by one GPU; the distributed optimizer divides
    master weights and Adam moments by dp (evenly: it cuts the flat buffer into equal shares)."""
    b = STATE_BYTES[layout.precision]
    d = layout.dp if layout.distributed_optimizer else 1
    parts = {
        "weights": parameters * b.weights,
        "gradients": parameters * b.gradients,
        "master_weights": parameters * b.master_weights // d,
        "optimizer": parameters * b.optimizer // d,
    }
    parts["total"] = sum(parts.values())
    return parts


# ------------------------------------------------------------------------------------------------
# Activations


def layer_activation_bytes(cfg: Config, layout: Layout, recompute: str | None = None) -> float:
    """Bytes one decoder layer keeps for backward, per micro-batch, on one GPU.

    Korthikanti et al. (2022) count what a GPT layer saves, per token, in units of h bytes at
    2 bytes per element: 34 + 5as/h with no parallelism, i.e. s*b*h*(34 + 5as/h) per layer
    (see `korthikanti_layer_bytes`). Done the same way for *this* model (megallm.model.llama:
    RMSNorm, fused QKV with GQA, RoPE, SDPA, SwiGLU, no dropout), per token, in elements:

      RMSNorm x2        input + output (the next GEMM's input)       2h each, or 3h each with
                        torch's RMSNorm, which also saves x*rsqrt (for the weight's gradient)
      fused QKV output  h(1 + 2g/a): SDPA saves v, a view that keeps the whole buffer alive
      q, k after RoPE   h + h*g/a
      attention output  h: saved by SDPA and, as the same storage, by the output projection
      attention scores  a*s: softmax probabilities, only without flash attention (5as/h in
                        Korthikanti's units: softmax 2 + dropout mask 1 + dropout output 2;
                        no dropout here leaves the softmax's 2)
      SwiGLU            fc1 output [gate|up] 2f, silu(gate) f, their product (fc2's input) f
      fp32 extras       1/rms per norm, and flash attention's log-sum-exp a per token

    Parallelism: tensor parallelism splits everything between the norms' outputs and the row-
    parallel GEMMs by t; the norms' inputs and outputs (4h) stay whole unless sequence parallelism
    splits them too (Korthikanti: 10 + 24/t without SP, 34/t with it). Under sequence parallelism
    the column-parallel GEMMs keep their local [s/t] input and all-gather it again in backward
    (megatron-core's linear does the same), so their saved input is the norm's split output.

    Recompute, as megallm.model.recompute runs it (torch.utils.checkpoint keeps a checkpointed
    piece's inputs and nothing inside it):
      selective  layernorm: each norm keeps input and output only (2h), no 1/rms;
                 swiglu: silu(gate) goes, the MLP keeps 3f; mlp: the MLP keeps nothing beyond its
                 input (the norm's output, counted above). Attention scores are never stored
                 with flash attention, so no selective mode is needed for them.
      full       this returns one checkpointed unit's kept input, h per token (split by SP);
                 `stage_activation_bytes` counts units, unprotected layers and the re-run.

    Cross-check, LLaMA2-70B (h 8192, a 64, g 8, f 28672 = 3.5h) in bf16 with fused norms and flash
    attention: 2*(4h + 1.25h + 1.125h + h + 14h) = 42.75 h bytes per token, against GPT's 34: the
    SwiGLU MLP at f = 3.5h keeps 28h where GPT's 4h GeLU MLP keeps 19h.
    """
    recompute = recompute or layout.recompute
    m, s, b, t = cfg.model, layout.seq_length, layout.micro_batch_size, layout.tp
    h, a, g, f = m.hidden_size, m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size
    split = t if layout.sequence_parallel else 1  # what sequence parallelism splits
    tokens = s * b
    if recompute == "full":
        return tokens * h / split * layout.act_bytes
    modules = layout.recompute_modules if recompute == "selective" else ()
    norm_recompute = "layernorm" in modules
    norms = 2 * (2 if (layout.fused_norm or norm_recompute) else 3) * h
    attention = h * (1 + 2 * g / a) + h * (1 + g / a) + h
    scores = 0 if layout.flash_attention else a * s
    mlp = 0 if "mlp" in modules else (3 if "swiglu" in modules else 4) * f
    fp32_extras = (0 if norm_recompute else 2 / split) + (a / t if layout.flash_attention else 0)
    return tokens * (layout.act_bytes * (norms / split + (attention + scores + mlp) / t) + 4 * fp32_extras)


def full_recompute_units(layers_per_chunk: int, method: str, num_layers: int) -> tuple[int, int, int]:
    """(checkpointed units, layers outside any checkpoint, layers in the largest unit) of one chunk,
    as megallm.model.recompute.checkpointed_units lays them out: uniform = groups of num_layers,
    block = the first num_layers layers one by one."""
    if method == "uniform":
        return -(-layers_per_chunk // num_layers), 0, min(num_layers, layers_per_chunk)
    k = min(num_layers, layers_per_chunk)
    return k, layers_per_chunk - k, 1


def korthikanti_layer_bytes(s: int, b: int, h: int, a: int, t: int = 1, sequence_parallel: bool = False,
                            recompute: str = "none") -> float:
    """Korthikanti et al. 2022 (Reducing Activation Recomputation in Large Transformer Models),
    per GPT layer, fp16/bf16, with dropout. Kept as the published reference the LLaMA count above
    is compared with (docs/planner.md), not used for plans.

    Attention block 11sbh + 5as^2b: QKV input 2, Q and K 4, V 2, softmax 2as^2b, its dropout mask
    as^2b and output 2as^2b, projection input 2, dropout mask 1. MLP 19sbh: fc1 input 2, GeLU
    input 8, fc2 input 8, dropout mask 1. Two LayerNorm inputs 4. Sum: sbh(34 + 5as/h).
    With t-way tensor parallelism the norms, the two block inputs and the dropout masks after the
    row-parallel GEMMs (10sbh) are replicated: sbh(10 + 24/t + 5as/(ht)); sequence parallelism
    splits them too: sbh(34 + 5as/h)/t. Selective recompute drops 5as/h; full recompute keeps the
    layer input only, 2sbh (/t with SP).
    """
    split = t if sequence_parallel else 1
    if recompute == "full":
        return 2 * s * b * h / split
    scores = 0 if recompute == "selective" else 5 * a * s / h
    return s * b * h * (10 / split + (24 + scores) / t)


def chunks_in_flight(layout: Layout, pipeline_rank: int) -> int:
    """Micro-batch x model-chunk forwards whose activations a pipeline rank holds at its peak.

    1F1B: rank r runs pp - r warm-up forwards before its first backward, so it holds min(pp - r,
    m) micro-batches; the first stage holds the most. Interleaved 1F1B (Megatron's schedule, and
    torch's ScheduleInterleaved1F1B): rank r warms up with 2(pp - r - 1) + (vpp - 1)pp chunk
    forwards, +1 in steady state. For rank 0 that is vpp*pp + pp - 1 chunks of L/(pp*vpp) layers:
    L(1 + (pp-1)/(pp*vpp)) layer-micro-batches, Korthikanti's factor 1 + (pp-1)/(pp*vpp) over
    plain 1F1B's L. GPipe holds all m. No pipeline: micro-batches run one after another (1).
    The zero-bubble schedule is taken as interleaved 1F1B (it holds at least as much).
    """
    pp, vpp, m = layout.pp, layout.vpp, layout.num_micro_batches
    if pp == 1:
        return 1
    if layout.schedule == "gpipe":
        return m * vpp
    if vpp == 1:
        return min(pp - pipeline_rank, m)
    return min(2 * (pp - pipeline_rank - 1) + (vpp - 1) * pp + 1, m * vpp)


def stage_activation_bytes(cfg: Config, layout: Layout, pipeline_rank: int) -> dict[str, float]:
    """Activation bytes at a pipeline rank's peak, by part.

    layers        chunks in flight x layers per chunk x `layer_activation_bytes` (full recompute:
                  the checkpointed units' inputs plus the full set of layers outside them)
    recompute     full recompute: the largest unit re-run in backward, with its full set, for one
                  micro-batch (held inside torch.utils.checkpoint, where saved-tensor hooks do not see it)
    pipeline      torch.distributed.pipelining keeps each chunk's output for its backward (Megatron
                  frees it): h per token, for every chunk in flight but the model's last, whose
                  output, the logits, is the fp32 copy the head counts, or in bf16 one more (V/t x 2
                  bytes per token, one micro-batch; not a saved tensor either). A received
                  input is the first layer's saved input (in `layers`); megallm's stages drop each
                  receive buffer once used (megallm.parallel.pipeline), where torch would keep one
                  per micro-batch, input and gradient, for the whole run
    inputs        token ids and labels (int64), RoPE's cos/sin tables (fp32, s x d, two per chunk)
    head          last rank, one micro-batch: final RMSNorm, and the logits: the fp32 copy the
                  vocab-parallel cross-entropy works on in place (V/t x 4 bytes per token)
    """
    m, s, b, t = cfg.model, layout.seq_length, layout.micro_batch_size, layout.tp
    h, tokens, act = m.hidden_size, s * b, layout.act_bytes
    split = t if layout.sequence_parallel else 1
    per_chunk = m.num_layers // (layout.pp * layout.vpp)
    in_flight = chunks_in_flight(layout, pipeline_rank)
    last = pipeline_rank == layout.pp - 1
    if layout.recompute == "full":
        units, unprotected, largest = full_recompute_units(per_chunk, layout.recompute_method or "uniform",
                                                           layout.recompute_num_layers or 1)
        every = layer_activation_bytes(cfg, layout, "none")
        parts = {"layers": in_flight * (units * layer_activation_bytes(cfg, layout) + unprotected * every)}
        parts["recompute"] = largest * every  # one unit re-run in backward, one micro-batch, transient
    else:
        parts = {"layers": in_flight * per_chunk * layer_activation_bytes(cfg, layout), "recompute": 0.0}
    kept_outputs = 0 if layout.pp == 1 else in_flight - (1 if last else 0)
    parts["pipeline"] = kept_outputs * tokens * h / split * act
    if last and layout.pp > 1 and act != 4:  # the model's last chunk's output: bf16 logits beside their fp32 copy
        parts["pipeline"] += tokens * cfg.padded_vocab_size / t * act
    ids = 8 * tokens * ((pipeline_rank == 0) + last)
    parts["inputs"] = ids + in_flight * 2 * s * m.kv_channels * 4
    if last:
        norm = (2 if layout.fused_norm else 3) * h / split * act + 4 / split
        logits = cfg.padded_vocab_size / t * 4
        parts["head"] = tokens * (norm + logits)
    else:
        parts["head"] = 0.0
    parts["total"] = sum(parts.values())
    return parts
