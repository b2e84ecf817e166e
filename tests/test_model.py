"""The LLaMA2 model against HuggingFace's, and the shard <-> logical weight mapping."""

import pytest
import torch

from megallm.config import apply_overrides, load_yaml
from megallm.model import weight_mapping as wm


def hf_llama(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups, max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=m.norm_epsilon, rope_theta=m.rotary_base, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False)).eval()


def test_logits_match_huggingface(single_rank):
    from megallm.model.llama import LlamaChunk

    cfg = load_yaml("configs/tiny.yaml")
    torch.manual_seed(0)
    hf = hf_llama(cfg)
    # HF's default init leaves norms at 1: perturb them so a swapped norm weight would show
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    ours = LlamaChunk(cfg, 0, cfg.model.num_layers, pre_process=True, post_process=True)
    state = hf.state_dict()
    wm.load_logical(ours, lambda name: state[name], cfg, tp_rank=0)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.training.seq_length))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert diff < 1e-4, diff


def test_init_is_layout_independent_and_megatron_scaled():
    cfg = load_yaml("configs/tiny.yaml")
    a = wm.init_logical(cfg, "model.layers.1.mlp.down_proj.weight", (128, 352))
    b = wm.init_logical(cfg, "model.layers.1.mlp.down_proj.weight", (128, 352))
    c = wm.init_logical(cfg, "model.layers.2.mlp.down_proj.weight", (128, 352))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # output layers: std / sqrt(2 * num_layers) = 0.02 / sqrt(8)
    assert a.std().item() == pytest.approx(0.02 / 8 ** 0.5, rel=0.05)
    assert wm.init_logical(cfg, "model.layers.0.self_attn.q_proj.weight", (512, 128)).std().item() == \
        pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("tp", [1, 2])
def test_shard_unshard_round_trip_keeps_gqa_groups(tp):
    cfg = apply_overrides(load_yaml("configs/tiny.yaml"), {"tp": tp})
    shapes = wm.logical_shapes(cfg, 0)
    logical = {k: torch.randn(v) for k, v in shapes.items()}
    for parts in wm.LAYER_PARTS.values():
        parts = [wm.Part(wm.layer_prefix(0) + p.logical, p.dim) for p in parts]
        shards = [wm.shard([logical[p.logical] for p in parts], [p.dim for p in parts], r, tp) for r in range(tp)]
        back = wm.to_logical(shards, parts, cfg)
        for p in parts:
            assert torch.equal(back[p.logical], logical[p.logical]), p.logical
    # rank r's fused QKV holds query heads [4r, 4r+4) and exactly their key/value group r
    if tp == 2:
        q, k = logical["model.layers.0.self_attn.q_proj.weight"], logical["model.layers.0.self_attn.k_proj.weight"]
        parts = wm.LAYER_PARTS["self_attention.linear_qkv.weight"]
        qkv1 = wm.shard([q, k, logical["model.layers.0.self_attn.v_proj.weight"]], [p.dim for p in parts], 1, 2)
        d = cfg.model.kv_channels
        assert torch.equal(qkv1[: 4 * d], q[4 * d: 8 * d])
        assert torch.equal(qkv1[4 * d: 5 * d], k[d: 2 * d])


def test_vocab_padding_rows_are_zero_and_dropped_again():
    cfg = apply_overrides(load_yaml("configs/tiny.yaml"),
                          {"vocab_size": 4000, "make_vocab_size_divisible_by": 128, "tp": 2})
    assert cfg.padded_vocab_size == 4096
    emb = torch.randn(4000, 128)
    padded = wm.pad_vocab(emb, cfg.padded_vocab_size)
    assert padded.shape == (4096, 128) and padded[4000:].abs().sum() == 0
    shards = [wm.shard([padded], [0], r, 2) for r in range(2)]
    back = wm.to_logical(shards, [wm.Part("model.embed_tokens.weight", 0)], cfg)
    assert torch.equal(back["model.embed_tokens.weight"], emb)
