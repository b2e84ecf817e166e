"""megallm's training iteration and HuggingFace LlamaForCausalLM's, on the same config and batch.

    world_of_one()                          # process groups for tp = pp = dp = 1 in this process
    tr = Trainer.build(cfg, 1)              # megallm: tr.train_step()
    hf = HFTrainer(cfg, tr.device, state_dict=hf_state_dict(tr.chunks[0], cfg))
    hf.step(*tr.local_batch(tr.train_ds, consumed_samples))

Both sides do the same work per iteration: forward and backward of every micro-batch of the
global batch (gradient accumulation), gradient clipping, one AdamW step with the same
hyperparameters and decay groups. Precision: megallm runs its parameters in the config's dtype
(bf16 on CUDA or with training.bf16, natively, with fp32 main grads, masters and Adam moments);
HF keeps fp32 weights under bf16 autocast on CUDA (its usual mixed precision) and runs fp32 on
the CPU. The HF loss is computed exactly as megallm's (token-mean cross-entropy of fp32 logits
against labels that are already shifted), so equal weights give equal losses in fp32: the check
that both sides run the same model.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from megallm.config import Config


def world_of_one(backend: str = "auto") -> None:
    """A one-rank default group and megatron's groups at tp = pp = 1, in this process."""
    from megallm import platform
    from megallm.parallel.topology import init_world_of_one, initialize_model_parallel

    init_world_of_one(platform.backend(backend))
    initialize_model_parallel(1, 1)


def hf_config(cfg: Config):
    from transformers import LlamaConfig

    m = cfg.model
    kwargs = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
                  num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                  num_key_value_heads=m.num_query_groups, max_position_embeddings=m.max_position_embeddings,
                  rms_norm_eps=m.norm_epsilon, tie_word_embeddings=not m.untie_embeddings_and_output_weights,
                  attention_bias=False, mlp_bias=False, use_cache=False, attn_implementation="sdpa")
    config = LlamaConfig(**kwargs)
    # transformers 5 keeps the RoPE base in rope_parameters, 4.x in rope_theta.
    if isinstance(getattr(config, "rope_parameters", None), dict):
        config.rope_parameters["rope_theta"] = m.rotary_base
    else:
        config.rope_theta = m.rotary_base
    return config


@torch.no_grad()
def hf_state_dict(chunk, cfg: Config) -> dict[str, torch.Tensor]:
    """A tp = pp = 1 LlamaChunk's weights under HuggingFace's names (weight_mapping's logical
    tensors are exactly those)."""
    from megallm.model import weight_mapping

    assert cfg.parallel.tensor_model_parallel_size == 1 and chunk.pre_process and chunk.post_process
    out = {}
    for _, param, parts in weight_mapping.local_parameters(chunk):
        out.update(weight_mapping.to_logical([param.detach()], parts, cfg))
    return out


def decay_groups(params: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """megallm's grouping: matrices decay, 1-D norm weights do not."""
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


class HFTrainer:
    """LlamaForCausalLM + torch.optim.AdamW doing megallm's iteration (module docstring)."""

    def __init__(self, cfg: Config, device: torch.device, state_dict: dict | None = None):
        from transformers import LlamaForCausalLM

        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.training.seed)
        with torch.device(device):
            self.model = LlamaForCausalLM(hf_config(cfg))
        self.model.float().train()  # fp32 weights (bf16 comes from autocast, on CUDA)
        if state_dict is not None:
            self.model.load_state_dict(state_dict)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optimizer
        self.optimizer = torch.optim.AdamW(decay_groups(self.params, o.weight_decay), lr=o.lr,
                                           betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                                           foreach=device.type == "cuda")  # as megallm builds it
        self.n_micro = cfg.training.global_batch_size // cfg.training.micro_batch_size

    def step(self, tokens: torch.Tensor, labels: torch.Tensor) -> float:
        """One iteration on [n_micro * micro_batch, seq] tokens; returns the mean loss."""
        for p in self.params:
            p.grad = None
        losses = []
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            for x, y in zip(tokens.chunk(self.n_micro), labels.chunk(self.n_micro)):
                logits = self.model(input_ids=x).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                (loss / self.n_micro).backward()
                losses.append(loss.detach())
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optimizer.clip_grad)
        self.optimizer.step()
        return float(torch.stack(losses).mean())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(result, seconds) of fn(), with the device drained before and after: CUDA work is
    asynchronous, and an optimizer step still running would be billed to the next iteration."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start
