"""Planner: exact counts, a hand derivation for LLaMA2-70B at tp 8 x pp 8, bubbles, search, CLI.

The CPU memory figures for configs/tiny.yaml were also checked against the lead's model: the bytes
autograd saves for one micro-batch (saved_tensors_hooks, by storage) came to 7,772,800 at tp 1 and
9,549,312 per rank at tp 2 (micro batch 2), against 7,772,672 and 9,548,800 predicted (the
difference is the cross-entropy's boolean target mask). The test that compares with measured
per-rank memory of real runs belongs with the training code (see docs/planner.md).
"""

import copy
import json

import pytest

from megallm.config import load_yaml, parameter_count
from megallm.planner import PlanError, fit_warning, memory_need_bytes, plan, predicted_rank_memory, search
from megallm.planner.devices import GiB
from megallm.planner.memory import chunks_in_flight, korthikanti_layer_bytes, layer_activation_bytes
from megallm.planner.throughput import bubble_fraction, model_flops_per_token

MiB = 2**20


@pytest.fixture
def cfg70():
    return load_yaml("configs/llama2_70b.yaml")


def test_70b_parameter_count_and_stage_split(cfg70):
    assert parameter_count(cfg70.model) == 68_976_648_192
    p = plan(cfg70, 64)
    # All tensor-parallel ranks of all stages together hold the model exactly once: per GPU x 8,
    # less the 7 extra copies of the replicated norm weights (2h per layer, h final).
    replicated = 80 * 2 * 8192 + 8192
    assert sum(s.parameters for s in p.stages) * 8 - 7 * replicated == 68_976_648_192
    assert [s.layers for s in p.stages][:2] == ["0-9", "10-19"]
    assert p.stages[0].has_embedding and p.stages[-1].has_head and not p.stages[3].has_head


def test_70b_tp8_pp8_hand_derivation(cfg70):
    # LLaMA2-70B, 64 H100 as tp 8 x pp 8 x dp 1, micro batch 2, seq 4096, global batch 1024,
    # no recompute, sequence parallel (as configs/llama2_70b.yaml), bf16 with fused norms and flash attention.
    #
    # Parameters on a GPU of pipeline rank 0 (layers 0-9 and the embedding):
    #   layer  = attention 8192*(8192 + 2*8*128) + 8192*8192 = 150,994,944
    #          + SwiGLU 3*8192*28672 = 704,643,072 + norms 2*8192 = 16,384      -> 855,654,400
    #   per GPU: (855,654,400 - 16,384)/8 + 16,384 (norms replicated)           -> 106,971,136
    #   10 layers 1,069,711,360 + embedding 32000*8192/8 = 32,768,000           -> 1,102,479,360
    params = 1_102_479_360
    # Model states, Megatron bf16 mixed precision: 2 + 4 + 4 + 4 + 4 = 18 bytes/param; the
    # distributed optimizer over dp = 1 shards nothing: 6 + 12/1 = 18 as well.
    states = 18 * params  # 19,844,628,480 B = 18.48 GiB
    # Activations per layer and micro-batch, per token, in elements (t = 8, sequence parallel):
    #   norms 2 x (input + output) = 4 x 8192 / 8                                  = 4,096
    #   QKV buffer 8192*(1 + 2*8/64) = 10,240; q, k after RoPE 8192 + 1,024 = 9,216;
    #   attention output 8,192: (10,240 + 9,216 + 8,192) / 8                       = 3,456
    #   SwiGLU 4 x 28672 / 8                                                       = 14,336
    #   = 21,888 elements x 2 bytes = 43,776 B, + fp32 1/rms (2/8) and log-sum-exp (64/8) x 4 = 33 B
    #   -> 43,809 B per token x 8192 tokens (s*b)                                  = 358,883,328 B
    # (Korthikanti's GPT layer would be 34/8 x 8192 x 8192 = 285,212,672 B: SwiGLU keeps more.)
    per_layer = 43_809 * 8192
    # 1F1B: rank 0 holds min(pp, m) = min(8, 512) = 8 micro-batches of its 10 layers;
    # torch's pipeline keeps each micro-batch's stage output: 8 x 8192 x 8192/8 x 2 B;
    # token ids 8 x 8192 B; RoPE cos+sin 8 x 2 x 4096 x 128 x 4 B.
    activations = 8 * 10 * per_layer + 8 * 8192 * 1024 * 2 + 8 * 8192 + 8 * 2 * 4096 * 128 * 4
    runtime = 3 * GiB
    for zero in (False, True):
        cfg70.parallel.use_distributed_optimizer = zero
        p = plan(cfg70, 64, "h100-80gb")
        assert (p.layout.dp, p.layout.num_micro_batches, p.layout.sequence_parallel) == (1, 512, True)
        assert p.peak_stage == 0 and p.stages[0].parameters == params
        assert p.model_state_bytes == states == 19_844_628_480
        assert p.activation_bytes == activations == 28_878_503_936
        assert p.total_bytes == states + activations + runtime
        assert p.fits and p.verdict == "fits" and p.margin_bytes == 81559 * MiB - p.total_bytes
    assert layer_activation_bytes(cfg70, p.layout) == per_layer
    assert korthikanti_layer_bytes(4096, 2, 8192, 64, 8, True, "selective") == 285_212_672


def test_70b_distributed_optimizer_shards_over_dp(cfg70):
    # 128 GPUs: dp 2. Without ZeRO 18 B/param; with it 6 + 12/2 = 12 B/param.
    plain = plan(cfg70, 128)
    cfg70.parallel.use_distributed_optimizer = False
    assert plan(cfg70, 128).model_state_bytes == 18 * 1_102_479_360
    assert plain.model_state_bytes == 12 * 1_102_479_360  # the config turns it on


def test_recompute_modes_and_attention_scores(cfg70):
    # Selective recompute with the default modules (layernorm, swiglu): silu(gate) (f/t elements
    # per token, 2 B) and the norms' fp32 1/rms (2/t x 4 B) are not kept, per layer and token.
    none, selective, full = (plan(cfg70, 64, recompute=r) for r in ("none", "selective", "full"))
    assert selective.layout.recompute_modules == ("layernorm", "swiglu")
    saved = 80 * 8192 * (2 * 28672 / 8 + 4 * 2 / 8)
    assert none.activation_bytes - selective.activation_bytes == pytest.approx(saved, abs=1)
    # Without flash attention the softmax's a*s elements per token (2 bytes each, /t) are stored.
    math_none = plan(cfg70, 64, recompute="none", flash_attention=False)
    scores_per_layer = 2 * 64 * 4096 / 8 * 8192 - 4 * 64 / 8 * 8192  # + scores - log-sum-exp
    assert math_none.activation_bytes - none.activation_bytes == pytest.approx(80 * scores_per_layer)
    # Full recompute (uniform, 1 layer): 80 layer inputs of 8192 x 1024 x 2 B, plus one layer re-run in full.
    per_layer = 43_809 * 8192
    assert full.stages[0].activations["layers"] == 80 * 8192 * 1024 * 2
    assert full.stages[0].activations["recompute"] == per_layer
    assert (full.hardware_flops_per_iteration > selective.hardware_flops_per_iteration
            == none.hardware_flops_per_iteration)
    # block recompute of 4 of a chunk's 10 layers: 4 kept inputs and 6 layers in full per micro-batch
    cfg70.training.recompute_granularity, cfg70.training.recompute_method = "full", "block"
    cfg70.training.recompute_num_layers = 4
    block = plan(cfg70, 64).stages[0].activations
    assert block["layers"] == 8 * (4 * 8192 * 1024 * 2 + 6 * per_layer) and block["recompute"] == per_layer
    assert full.flops_per_iteration == none.flops_per_iteration  # MFU counts model FLOPs only


def test_korthikanti_reference_formulas():
    s, b, h, a, t = 2048, 1, 12288, 96, 8
    assert korthikanti_layer_bytes(s, b, h, a) == s * b * h * (34 + 5 * a * s / h)
    assert korthikanti_layer_bytes(s, b, h, a, t) == s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
    assert korthikanti_layer_bytes(s, b, h, a, t, True, "selective") == s * b * h * 34 / t
    assert korthikanti_layer_bytes(s, b, h, a, t, True, "full") == 2 * s * b * h / t


def test_bubble_and_micro_batches_in_flight(cfg70):
    layout = plan(cfg70, 64).layout
    assert bubble_fraction(layout) == 7 / 512
    assert [chunks_in_flight(layout, r) for r in (0, 3, 7)] == [8, 5, 1]
    small = copy.deepcopy(cfg70)
    small.training.global_batch_size = 8  # m = 4 < pp: rank 0 holds all 4
    assert chunks_in_flight(plan(small, 64).layout, 0) == 4
    assert plan(small, 64).bubble_fraction == 7 / 4
    cfg70.parallel.virtual_pipeline_model_parallel_size = 5
    cfg70.parallel.pipeline_schedule = "interleaved_1f1b"
    inter = plan(cfg70, 64)
    assert inter.bubble_fraction == 7 / (5 * 512)
    # rank 0: 2(p-1) + (v-1)p + 1 = 14 + 32 + 1 = 47 chunks of 2 layers = 94 layer-micro-batches,
    # Korthikanti's L(1 + (p-1)/(pv)) = 80 x (1 + 7/40) = 94.
    assert chunks_in_flight(inter.layout, 0) == 47 and inter.stages[0].layers == "0-1,16-17,32-33,48-49,64-65"
    cfg70.parallel.pipeline_model_parallel_size, cfg70.parallel.virtual_pipeline_model_parallel_size = 1, None
    cfg70.parallel.pipeline_schedule = "auto"  # interleaved without virtual stages is refused
    assert plan(cfg70, 64).bubble_fraction == 0.0


def test_flops_per_token_matches_published_anchor(cfg70):
    # 6N + 12*L*h*s, N without the input embedding (a lookup): NeMo's LLaMA2-70B run reports
    # 759 TFLOP/s per GPU at 1707 tokens/s per GPU, i.e. 444.6 GFLOP per token.
    n = 68_976_648_192 - 32000 * 8192
    assert model_flops_per_token(cfg70) == 6 * n + 12 * 80 * 8192 * 4096
    assert model_flops_per_token(cfg70) == pytest.approx(759e12 / 1707, rel=2e-3)
    p = plan(cfg70, 64)
    assert p.flops_per_iteration == model_flops_per_token(cfg70) * 1024 * 4096
    assert 0.3 < p.mfu < 0.6  # the published anchors for this kind of run are 46-55%
    assert p.mfu == pytest.approx(p.flops_per_iteration / (64 * 989.4e12 * p.iteration_time_s))


def test_communication_volumes(cfg70):
    p = plan(cfg70, 64)
    msg = 4096 * 2 * 8192 * 2  # one [s, b, h] bf16 activation
    # TP on rank 0: 512 micro-batches x (10 layers x 4 all-reduces + the embedding's), 2(t-1)/t each
    assert p.comm_bytes_per_gpu["tensor_parallel"] == 512 * 41 * 2 * 7 / 8 * msg
    assert p.comm_bytes_per_gpu["pipeline_parallel"] == 2 * 512 * msg / 8  # split by SP
    assert p.comm_bytes_per_gpu["data_parallel"] == 0  # dp 1
    grads = 1_102_487_552 * 4  # the last stage holds the most parameters (head + final norm)
    assert plan(cfg70, 128).comm_bytes_per_gpu["data_parallel"] == pytest.approx(grads / 2 + 1_102_487_552 * 2 / 2)


def test_search_70b_on_64_h100(cfg70):
    plans = search(cfg70, nodes=8, gpus_per_node=8, device="h100-80gb")
    assert len(plans) > 20
    assert all(p.fits and p.layout.tp * p.layout.pp * p.layout.dp == 64 and p.layout.tp <= 8 for p in plans)
    rates = [p.tokens_per_s for p in plans]
    assert rates == sorted(rates, reverse=True)
    keys = {(p.layout.tp, p.layout.pp, p.layout.vpp, p.layout.micro_batch_size, p.layout.recompute) for p in plans}
    assert (8, 8, 1, 2, "selective") in keys
    assert not any(p.layout.tp == 1 and p.layout.pp == 1 for p in plans)
    one = copy.deepcopy(cfg70)
    one.parallel.tensor_model_parallel_size = one.parallel.pipeline_model_parallel_size = 1
    whole = plan(one, 64, recompute="full")
    n = 68_976_648_192  # the whole model on every GPU: 6 + 12/64 B/param = 397 GiB
    assert not whole.fits and whole.model_state_bytes == 6 * n + 4 * n // 64 + 8 * n // 64


def test_launcher_warning_uses_the_run_as_configured(cfg70):
    # The published recipe without sequence parallelism or recompute: micro batch 2 then needs
    # more than an H100 holds (configs/llama2_70b.yaml turns sequence parallelism on for it).
    assert memory_need_bytes(cfg70, 64, "h100-80gb") < 81559 * MiB
    cfg70.parallel.sequence_parallel = False
    need = memory_need_bytes(cfg70, 64, "h100-80gb")
    assert need == plan(cfg70, 64, recompute="none", sequence_parallel=False).total_bytes
    assert need > 81559 * MiB
    warning = fit_warning(cfg70, 64, 81559 * MiB, "h100-80gb")
    assert warning.startswith("layout will not fit: pipeline rank 0 needs about")
    assert fit_warning(cfg70, 64, 141 * GiB, "h100-80gb") is None
    assert "under 5% to spare" in fit_warning(cfg70, 64, need + need // 100, "h100-80gb")


def test_predicted_rank_memory_cpu_fp32():
    cfg = load_yaml("configs/tiny.yaml")
    # tp 1: 4 layers x 128 tokens x per-token bytes 4 x (norms 4h (input + output: megallm's
    # RMSNorm saves input and 1/rms) + QKV 1.5h + q,k 1.25h + out h + SwiGLU 4f + 2 (1/rms) + 8
    # (log-sum-exp)) = 4 x 128 x 4 x 2410, + the head: final norm (2h + 1) and fp32 logits V,
    # 4 x (257 + 4096) x 128, + ids/labels 16 x 128, cos/sin 2 x 128 x 16 x 4.
    r = predicted_rank_memory(cfg, 1, 0)
    assert r["activation_bytes"] == 4 * 128 * 4 * 2410 + 4 * 128 * (257 + 4096) + 16 * 128 + 2 * 128 * 16 * 4
    # fp32 on one rank: weight 4 + main grad 4 + Adam 8 = 16 B/param
    assert r["parameters"] == parameter_count(cfg.model) == 1_754_240 and r["model_state_bytes"] == 16 * 1_754_240
    cfg.parallel.tensor_model_parallel_size = cfg.parallel.pipeline_model_parallel_size = 2
    cfg.parallel.use_distributed_optimizer = True
    # 8 ranks: tp 2 x dp 2 x pp 2; rank = tp_rank + 2*(dp_rank + 2*pp_rank): ranks 4-7 are pp 1.
    r5 = predicted_rank_memory(cfg, 8, 5)
    assert r5["pipeline_rank"] == 1 and r5["chunks_in_flight"] == 1
    # pp rank 1: layers 2-3 split over tp (norms whole) + head 4096*128/2 + final norm 128
    layer = 176_384
    assert r5["parameters"] == 2 * ((layer - 256) // 2 + 256) + 4096 * 128 // 2 + 128
    # fp32 weights are their own masters; the distributed optimizer shards Adam over dp 2
    assert r5["model_state_bytes"] == r5["parameters"] * (8 + 8 // 2)


def test_errors_are_clear(cfg70):
    with pytest.raises(PlanError, match="world size 48"):
        plan(cfg70, 48)
    with pytest.raises(PlanError, match="recompute='some'"):
        plan(cfg70, 64, recompute="some")
    with pytest.raises(ValueError, match="unknown device 'h300'"):
        plan(cfg70, 64, device="h300")


def test_cli(capsys, tmp_path):
    from tools.plan import main

    assert main(["--config", "configs/llama2_70b.yaml", "--nodes", "8", "--gpus-per-node", "8", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["fits"] and d["layout"]["tp"] == 8 and d["stages"][0]["parameters"] == 1_102_479_360
    assert main(["--config", "configs/llama2_70b.yaml", "--nodes", "8", "--gpus-per-node", "8", "--tp", "1",
                 "--pp", "1", "--recompute", "full"]) == 1
    assert "verdict: DOES NOT FIT" in capsys.readouterr().out
    assert main(["--config", "configs/llama2_70b.yaml", "--nodes", "8", "--gpus-per-node", "8", "--search",
                 "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "layouts fit 68,976,648,192 parameters on 64 x h100-80gb" in out and len(out.splitlines()) == 6
    assert main(["--config", "configs/llama2_70b.yaml", "--gpus-per-node", "6"]) == 2
    assert "plan error: world size 6" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_sise: 4\n")
    with pytest.raises(SystemExit) as e:
        main(["--config", str(bad)])
    assert e.value.code == 2 and "unknown field 'model.hidden_sise'" in capsys.readouterr().err


def _launcher():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_llama2", "launch/pretrain_llama2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_detect_device_by_name_and_memory():
    from megallm.planner import detect_device

    assert detect_device("NVIDIA H100 80GB HBM3", 81559 * MiB) == "h100-80gb"
    assert detect_device("NVIDIA H100 NVL", 95830 * MiB) == "h100-94gb"
    assert detect_device("NVIDIA H200", 143771 * MiB) == "h200-141gb"
    assert detect_device("NVIDIA A100-SXM4-40GB", 40960 * MiB) == "a100-40gb"
    assert detect_device("NVIDIA A100-SXM4-80GB", 81920 * MiB) == "a100-80gb"
    assert detect_device("Tesla T4", 15 * GiB) is None


def test_launcher_refuses_70b_without_sequence_parallel_on_80gb(cfg70, capsys):
    launcher, h100 = _launcher(), ("NVIDIA H100 80GB HBM3", 81559 * MiB)
    assert launcher.check_before_start(cfg70, 64, device_description=h100) == 0  # the recipe, SP on, fits
    cfg70.parallel.sequence_parallel = False
    assert launcher.check_before_start(cfg70, 64, device_description=h100) == 2
    out = capsys.readouterr().err  # refusals go to stderr, once per machine (megallm.inputs.refuse)
    assert "memory error: this layout does not fit h100-80gb" in out and "verdict: DOES NOT FIT" in out
    fixes = out.split("flags that would fit:")[1].splitlines()[1:4]
    assert fixes[0].split()[0] == "--sequence-parallel" and "--recompute-granularity full" in fixes[1]
    assert "refusing to start (--no-memory-check starts anyway)" in out
    # the same layout on an H200 fits; --no-memory-check skips the plan; --gpu overrides the detected device
    assert launcher.check_before_start(cfg70, 64, device_description=("NVIDIA H200", 143771 * MiB)) == 0
    assert launcher.check_before_start(cfg70, 64, memory_check=False, device_description=h100) == 0
    assert launcher.check_before_start(cfg70, 64, gpu="h200-141gb", device_description=h100) == 0
