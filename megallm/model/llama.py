"""The LLaMA2 decoder, assembled from megatron-core's tensor-parallel layers.

    tokens -> VocabParallelEmbedding -> N x [x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x))]
           -> RMSNorm -> ColumnParallelLinear (vocab-parallel logits)

Hidden states are [s, b, h] (Megatron's layout, sequence first) between the embedding and the
output layer; with sequence parallelism (megallm.parallel.sequence_parallel) each tensor-parallel
rank holds [s/tp, b, h] there, and the megatron linears all-gather / reduce-scatter the sequence.

A pipeline stage holds a `LlamaChunk`: a contiguous range of decoder layers, plus the embedding
on the first chunk and the final norm and output head on the last. The model knows nothing of
process groups: the megatron layers find their tensor-parallel group themselves, and all shapes
below are per tensor-parallel rank ("local").

Fused weights, per tensor-parallel rank r (the weight mapping in `weight_mapping.py` converts):
    linear_qkv rows = [q heads of r | k groups of r | v groups of r]
    linear_fc1 rows = [gate of r | up of r]
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megallm import platform
from megallm.config import Config, ModelConfig
from megallm.model import recompute
from megallm.model.norm import RMSNorm, make_norm  # noqa: F401  (RMSNorm re-exported)


def _tensor_parallel():
    # Imported lazily: megatron.core costs seconds to import and tools like the planner do not need it.
    from megatron.core import tensor_parallel
    from megatron.core.model_parallel_config import ModelParallelConfig

    return tensor_parallel, ModelParallelConfig


class RotaryEmbedding(nn.Module):
    """RoPE in the rotate-half convention (HuggingFace's weight layout; no q/k permutation needed)."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq.to(device))
        angles = torch.cat([freqs, freqs], dim=-1)  # [s, head_dim]
        return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [b, heads, s, d]; cos/sin: [s, d]."""
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


class Attention(nn.Module):
    """Grouped-query causal self-attention; each tensor-parallel rank owns whole query groups."""

    def __init__(self, m: ModelConfig, mp_config, tp: int, init_method, output_init_method, tp_group=None):
        super().__init__()
        tensor_parallel, _ = _tensor_parallel()
        row_parallel_linear = _row_parallel_linear(mp_config)
        self.head_dim = m.kv_channels
        self.num_heads = m.num_attention_heads // tp
        self.num_groups = m.num_query_groups // tp
        qkv_out = (m.num_attention_heads + 2 * m.num_query_groups) * self.head_dim
        self.linear_qkv = tensor_parallel.ColumnParallelLinear(
            m.hidden_size, qkv_out, config=mp_config, init_method=init_method, bias=False, gather_output=False,
            tp_group=tp_group)
        self.linear_proj = row_parallel_linear(
            m.num_attention_heads * self.head_dim, m.hidden_size, config=mp_config, init_method=output_init_method,
            bias=False, input_is_parallel=True, skip_bias_add=True, tp_group=tp_group)
        self.dropout = m.attention_dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.linear_qkv(x)  # [s, b, (q + 2 kv)/tp]: the whole sequence, even under sequence parallel
        s, b, _ = qkv.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_groups * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(s, b, self.num_heads, self.head_dim).permute(1, 2, 0, 3)  # [b, heads, s, d]
        k = k.view(s, b, self.num_groups, self.head_dim).permute(1, 2, 0, 3)
        v = v.view(s, b, self.num_groups, self.head_dim).permute(1, 2, 0, 3)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True, dropout_p=self.dropout if self.training else 0.0)
        out, _ = self.linear_proj(out.permute(2, 0, 1, 3).reshape(s, b, q_size))
        return out


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up fused into one column-parallel GEMM."""

    def __init__(self, m: ModelConfig, mp_config, tp: int, init_method, output_init_method, tp_group=None,
                 recompute_activation: bool = False):
        super().__init__()
        tensor_parallel, _ = _tensor_parallel()
        self.recompute_activation = recompute_activation
        self.linear_fc1 = tensor_parallel.ColumnParallelLinear(
            m.hidden_size, 2 * m.ffn_hidden_size, config=mp_config, init_method=init_method, bias=False,
            gather_output=False, tp_group=tp_group)
        self.linear_fc2 = _row_parallel_linear(mp_config)(
            m.ffn_hidden_size, m.hidden_size, config=mp_config, init_method=output_init_method, bias=False,
            input_is_parallel=True, skip_bias_add=True, tp_group=tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1, _ = self.linear_fc1(x)
        out, _ = self.linear_fc2(recompute.maybe_checkpoint(self.recompute_activation, swiglu, fc1))
        return out


def swiglu(fc1: torch.Tensor) -> torch.Tensor:
    gate, up = fc1.chunk(2, dim=-1)
    return F.silu(gate) * up


class DecoderLayer(nn.Module):
    """x: [s, b, h] ([s/tp, b, h] under sequence parallelism). `recompute_modules`: the pieces that
    selective recompute re-runs in backward (see megallm.model.recompute)."""

    def __init__(self, m: ModelConfig, mp_config, tp: int, init_method, output_init_method, tp_group=None,
                 recompute_modules: tuple[str, ...] = ()):
        super().__init__()
        self.input_layernorm = make_norm(m.hidden_size, m.norm_epsilon, mp_config.params_dtype)
        self.self_attention = Attention(m, mp_config, tp, init_method, output_init_method, tp_group)
        self.post_attention_layernorm = make_norm(m.hidden_size, m.norm_epsilon, mp_config.params_dtype)
        self.mlp = MLP(m, mp_config, tp, init_method, output_init_method, tp_group,
                       recompute_activation="swiglu" in recompute_modules)
        self.hidden_dropout = m.hidden_dropout
        self.recompute_norm, self.recompute_mlp = "layernorm" in recompute_modules, "mlp" in recompute_modules

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        normed = recompute.maybe_checkpoint(self.recompute_norm, self.input_layernorm, x)
        x = x + F.dropout(self.self_attention(normed, cos, sin), self.hidden_dropout, self.training)
        normed = recompute.maybe_checkpoint(self.recompute_norm, self.post_attention_layernorm, x)
        return x + F.dropout(recompute.maybe_checkpoint(self.recompute_mlp, self.mlp, normed), self.hidden_dropout,
                             self.training)


class LlamaChunk(nn.Module):
    """Decoder layers [first_layer, first_layer + num_layers) of the model, with the embedding if
    `pre_process` and the final norm + output head if `post_process`.

    forward: tokens [b, s] (pre_process) or hidden [s, b, h] ([s/tp, b, h] with sequence
    parallelism) -> the same hidden layout, or vocab-parallel logits [b, s, vocab/tp]
    (post_process). `tp_group` is handed to megatron's layers as is (megatron is making it a
    required argument); the model itself never communicates.
    """

    def __init__(self, cfg: Config, first_layer: int, num_layers: int, pre_process: bool, post_process: bool,
                 device: Optional[torch.device] = None, tp_group=None):
        super().__init__()
        tensor_parallel, ModelParallelConfig = _tensor_parallel()
        m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
        # Megatron turns sequence parallelism off at tp 1, where there is nothing to split.
        self.sequence_parallel = cfg.parallel.sequence_parallel and tp > 1
        self.tp, self.tp_group = tp, tp_group
        t = cfg.training
        self.recompute = (t.recompute_granularity, t.recompute_method, t.recompute_num_layers)
        modules = tuple(t.recompute_modules) if t.recompute_granularity == "selective" else ()
        # Weights are filled afterwards from layout-independent values (see init_weights), so
        # megatron's own initialisation is skipped. Parameters are created in the training precision
        # (bf16 under --bf16: the fp32 masters live in the optimizer, megallm.parallel.distributed_optimizer).
        mp_config = ModelParallelConfig(
            tensor_model_parallel_size=tp, use_cpu_initialization=(device is None or device.type != "cuda"),
            perform_initialization=False, params_dtype=platform.resolved_params_dtype(cfg),
            sequence_parallel=self.sequence_parallel)
        noop = lambda w: w  # noqa: E731
        self.first_layer, self.pre_process, self.post_process = first_layer, pre_process, post_process
        self.layer_numbers = list(range(first_layer, first_layer + num_layers))
        if pre_process:
            self.embedding = tensor_parallel.VocabParallelEmbedding(
                cfg.padded_vocab_size, m.hidden_size, init_method=noop, config=mp_config, tp_group=tp_group)
        self.layers = nn.ModuleList(DecoderLayer(m, mp_config, tp, noop, noop, tp_group, modules)
                                    for _ in self.layer_numbers)
        if post_process:
            self.final_layernorm = make_norm(m.hidden_size, m.norm_epsilon, mp_config.params_dtype)
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                m.hidden_size, cfg.padded_vocab_size, config=mp_config, init_method=noop, bias=False,
                gather_output=False, tp_group=tp_group)
        self.rotary = RotaryEmbedding(m.kv_channels, m.rotary_base)
        linears = [layer for layer in self.modules()
                   if isinstance(layer, (tensor_parallel.ColumnParallelLinear, tensor_parallel.RowParallelLinear))]
        if tp == 1:
            for layer in linears:
                layer._forward_impl = _plain_linear
        if self.sequence_parallel:
            from megallm.parallel import sequence_parallel as sp

            for layer in linears:  # megatron's on CUDA, a device-agnostic twin elsewhere
                layer._forward_impl = sp.linear_with_sequence_parallel
            for norm in self.norms():
                sp.mark_sequence_parallel(norm)

    def norms(self) -> list[nn.Module]:
        """The RMSNorms: replicated over tensor parallel, fed only this rank's tokens under sequence parallel."""
        norms = [n for layer in self.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        return norms + ([self.final_layernorm] if self.post_process else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_process:
            x = self.embedding(x.t())  # [s, b, h] straight from the transposed token ids
            if self.sequence_parallel:
                from megallm.parallel import sequence_parallel as sp

                # The scatter returns a slice of the full [s, b, h] embedding output (megatron's
                # _split_along_first_dim as well: a dim-0 slice is already contiguous, so its
                # .contiguous() copies nothing), and the first norm saves that slice for backward:
                # the whole embedding output would stay alive, s*b*h per micro-batch instead of
                # s*b*h/tp. Megatron clones it here (clone_scatter_output_in_embedding, on by default).
                x = sp.scatter_to_sequence_parallel_region(x, self.tp_group).clone()
        seq_length = x.shape[0] * (self.tp if self.sequence_parallel else 1)
        cos, sin = self.rotary(seq_length, x.device)
        x = recompute.run_layers(self.layers, x, cos, sin, *self.recompute)
        if self.post_process:
            x, _ = self.output_layer(self.final_layernorm(x))  # gathers the sequence under sequence parallel
            x = x.transpose(0, 1).contiguous()  # [b, s, vocab/tp]: the loss's (and HuggingFace's) layout
        return x


def _row_parallel_linear(mp_config):
    """megatron's RowParallelLinear, or with sequence parallelism its subclass whose reduce-scatter
    also runs off CUDA (megallm.parallel.sequence_parallel)."""
    if not mp_config.sequence_parallel:
        return _tensor_parallel()[0].RowParallelLinear
    from megallm.parallel.sequence_parallel import RowParallelLinear

    return RowParallelLinear


def _plain_linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, **_) -> torch.Tensor:
    """The GEMM of megatron's linear layers at tensor parallel 1, where megatron's autograd Function
    has nothing to communicate (and sequence parallel and gradient-accumulation fusion are off here)
    but still copies the output gradient to a contiguous buffer in backward: forward + backward
    took 2-31% longer than torch's linear at the tiny config's shapes on CPU (bench/RESULTS.md 1)."""
    return F.linear(input, weight, bias)
