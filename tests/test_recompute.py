"""Activation recompute re-runs the same arithmetic: loss and every gradient bitwise equal to the
run that keeps everything, in one process (the tp x pp x dp runs are in test_parallel_equivalence)."""

import pytest
import torch

from megallm.config import apply_overrides, load_yaml, validate
from megallm.model.recompute import checkpointed_units

MODES = {
    "full_uniform_1": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    "full_uniform_3": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 3},
    "full_block_2": {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 2},
    "selective_norm_swiglu": {"recompute_granularity": "selective", "recompute_modules": ["layernorm", "swiglu"]},
    "selective_mlp": {"recompute_granularity": "selective", "recompute_modules": ["mlp"]},
}


def loss_and_grads(overrides):
    from megallm.model import weight_mapping
    from megallm.model.llama import LlamaChunk
    from megallm.training.loop import loss_fn

    cfg = apply_overrides(load_yaml("configs/tiny.yaml"), {"hidden_dropout": 0.1, **overrides})
    chunk = LlamaChunk(cfg, 0, cfg.model.num_layers, pre_process=True, post_process=True)
    weight_mapping.init_weights(chunk, cfg, 0)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)  # dropout masks: recompute must replay the same ones
    loss = loss_fn(chunk(tokens), tokens)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in chunk.named_parameters()}


@pytest.mark.parametrize("mode", MODES)
def test_recompute_is_bitwise_the_same(single_rank, mode):
    ref_loss, ref = loss_and_grads({})
    loss, grads = loss_and_grads(MODES[mode])
    assert torch.equal(loss, ref_loss)
    assert ref.keys() == grads.keys()
    for name in ref:
        assert torch.equal(ref[name], grads[name]), name


def test_units_cover_each_layer_once():
    assert checkpointed_units(4, "uniform", 3) == [(0, 3, True), (3, 1, True)]
    assert checkpointed_units(4, "block", 2) == [(0, 1, True), (1, 1, True), (2, 2, False)]
    assert checkpointed_units(2, "block", 5) == [(0, 1, True), (1, 1, True)]


@pytest.mark.parametrize("overrides, message", [
    ({"recompute_granularity": "everything"}, "recompute_granularity='everything'"),
    ({"recompute_granularity": "full", "recompute_num_layers": 1}, "needs --recompute-method"),
    ({"recompute_granularity": "full", "recompute_method": "block"}, "needs --recompute-num-layers"),
    ({"recompute_granularity": "selective", "recompute_method": "uniform"}, "only for recompute_granularity=full"),
    ({"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}, "unknown ['core_attn']"),
    ({"sequence_parallel": True, "tp": 2, "seq_length": 127}, "sequence_parallel splits the sequence"),
])
def test_bad_recompute_and_sequence_parallel_flags(overrides, message):
    errors = validate(apply_overrides(load_yaml("configs/tiny.yaml"), overrides))
    assert any(message in e for e in errors), errors
