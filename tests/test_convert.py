"""HuggingFace <-> megallm checkpoint conversion in one process (tp = pp = 1); the other layouts
run under torchrun in test_convert_layouts.py.

The tiny HF model has an odd vocabulary (1001: padded to 1002 at tp 2), non-default rope_theta
and rms_norm_eps (a converter that dropped them would still load but give other logits), and
perturbed norm weights (HF initialises them to 1, which would hide a swapped norm)."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from megallm import checkpoint
from megallm.checkpoint import convert
from megallm.checkpoint.hf_config import ConversionError
from megallm.checkpoint.hf_files import parse_size, plan_shards
from megallm.config import apply_overrides, load_yaml
from tests.test_model import hf_llama

TINY = {"vocab_size": 1001, "hidden_size": 64, "ffn_hidden_size": 176, "num_attention_heads": 8, "num_query_groups": 2,
        "num_layers": 4, "max_position_embeddings": 64, "rotary_base": 50000.0, "norm_epsilon": 1e-6}


def tiny_hf_model(seed: int = 0):
    torch.manual_seed(seed)
    model = hf_llama(apply_overrides(load_yaml("configs/tiny.yaml"), TINY))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_weights(directory) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(directory written by save_pretrained, tokens, HF's fp32 logits for them)"""
    model = tiny_hf_model()
    directory = tmp_path_factory.mktemp("hf") / "tiny-llama"
    model.save_pretrained(directory)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens).logits
    return directory, tokens, logits


def megallm_logits(ckpt_root, tokens) -> torch.Tensor:
    from megallm.model.llama import LlamaChunk

    ckpt = convert.resolve_megallm(ckpt_root)
    cfg = convert.config_from_meta(checkpoint.read_meta(ckpt), "meta.json")
    cfg.parallel.tensor_model_parallel_size = 1  # this process is a world of one
    chunk = LlamaChunk(cfg, 0, cfg.model.num_layers, pre_process=True, post_process=True)
    checkpoint.load_model_weights([chunk], cfg, ckpt, tp_rank=0)
    with torch.no_grad():
        return chunk(tokens)


def hf_logits(directory, tokens) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def test_hf_to_megallm_to_hf_round_trip(hf, tmp_path, single_rank):
    src, tokens, expected = hf
    iter_path = convert.hf_to_megallm(src, tmp_path / "mg", tp=2, pp=2)
    assert iter_path == tmp_path / "mg" / "iter_0000000"
    assert (tmp_path / "mg" / checkpoint.LATEST).read_text() == "0"
    meta = checkpoint.read_meta(iter_path)
    assert checkpoint.is_model_only(meta) and meta["iteration"] == 0
    assert (meta["layout"]["tp"], meta["layout"]["pp"]) == (2, 2)
    assert meta["config"]["model"]["rotary_base"] == 50000.0 and meta["config"]["model"]["norm_epsilon"] == 1e-6
    assert sorted(p.name for p in (iter_path / "model").iterdir()) == \
        ["embedding.safetensors", "head.safetensors"] + [f"layer_{i:05d}.safetensors" for i in range(4)]

    diff = (megallm_logits(tmp_path / "mg", tokens) - expected).abs().max().item()
    assert diff < 1e-4, diff

    # 200 KB shards: the 1001 x 64 fp32 embedding (256 KB) gets a shard of its own, layers share
    out = convert.megallm_to_hf(tmp_path / "mg", tmp_path / "hf_back", max_shard_size=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "hf_back.partial").exists()
    original, back = hf_weights(src), hf_weights(out)
    assert back.keys() == original.keys()
    for name in original:
        assert back[name].dtype == torch.float32 and torch.equal(back[name], original[name]), name
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in back.values())
    config = json.loads((out / "config.json").read_text())
    assert (config["rope_theta"], config["rms_norm_eps"], config["num_key_value_heads"]) == (50000.0, 1e-6, 2)
    assert torch.equal(hf_logits(out, tokens), expected)


def test_pytorch_bin_checkpoint_converts_like_safetensors(hf, tmp_path):
    import shutil

    src, _, _ = hf
    # transformers 5 only writes safetensors; older releases (and many hub repos) have what
    # save_pretrained(safe_serialization=False) wrote: a torch.save'd state dict
    (tmp_path / "bin").mkdir()
    shutil.copy(src / "config.json", tmp_path / "bin")
    torch.save(hf_weights(src), tmp_path / "bin" / "pytorch_model.bin")
    a = convert.hf_to_megallm(src, tmp_path / "a")
    b = convert.hf_to_megallm(tmp_path / "bin", tmp_path / "b")
    for f in (a / "model").iterdir():
        x, y = load_file(str(f)), load_file(str(b / "model" / f.name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f.name


def test_bf16_export_loads_in_transformers(hf, tmp_path):
    src, tokens, expected = hf
    convert.hf_to_megallm(src, tmp_path / "mg")
    out = convert.megallm_to_hf(tmp_path / "mg", tmp_path / "hf16", dtype="bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    weights = hf_weights(out)
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    # bf16 keeps 8 bits of mantissa: logits move by about 1% of their scale, no more
    diff = (hf_logits(out, tokens) - expected).abs().max().item()
    assert 0 < diff < 0.05 * expected.abs().max().item()


def test_reshard_is_a_verified_copy_under_a_validated_layout(hf, tmp_path):
    src, _, _ = hf
    a = convert.hf_to_megallm(src, tmp_path / "a", tp=1, pp=1)
    b = convert.reshard(tmp_path / "a", tmp_path / "b", tp=2, pp=2, vpp=2)
    meta_a, meta_b = checkpoint.read_meta(a), checkpoint.read_meta(b)
    assert meta_b["files"] == meta_a["files"]
    assert (meta_b["layout"]["tp"], meta_b["layout"]["pp"], meta_b["layout"]["vpp"]) == (2, 2, 2)
    assert meta_b["config"]["parallel"]["pipeline_schedule"] == "interleaved_1f1b"
    with pytest.raises(ConversionError, match=r"num_layers=4: must be divisible by .* 4 x 2"):
        convert.reshard(tmp_path / "a", tmp_path / "c", tp=1, pp=4, vpp=2)
    # a flipped byte in the source is caught, and the half-done copy is removed
    layer = a / "model" / "layer_00002.safetensors"
    data = bytearray(layer.read_bytes())
    data[-1] ^= 1
    layer.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="layer_00002.safetensors: checksum mismatch"):
        convert.reshard(tmp_path / "a", tmp_path / "d", tp=2)
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


def _edit_config(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "mistral"}, r"config.json: model_type='mistral': only 'llama'"),
    ({"tie_word_embeddings": True}, r"config.json: tie_word_embeddings=True is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, r"rope_parameters.rope_type='llama3'"),
    ({"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}}, r"rope_scaling=.*only plain RoPE"),
    ({"attention_bias": True}, r"attention_bias=True is not supported"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported"),
    ({"intermediate_size": 180}, r"model.safetensors: 'model.layers.0.mlp.gate_proj.weight' has shape "
                                 r"\(176, 64\), config.json implies \(180, 64\)"),
])
def test_bad_hf_configs_are_refused_naming_the_key(hf, tmp_path, changes, message):
    src = _edit_config(hf[0], tmp_path / "edited", **changes)
    with pytest.raises(ConversionError, match=message):
        convert.hf_to_megallm(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tp_must_divide_query_groups_naming_the_hf_key(hf, tmp_path):
    with pytest.raises(ConversionError, match=r"num_query_groups=2: must be divisible by tensor_model_parallel_size=4"
                                              r".*\(key 'num_key_value_heads'\)"):
        convert.hf_to_megallm(hf[0], tmp_path / "out", tp=4)


def test_missing_shards_and_tensors_are_named(hf, tmp_path):
    import shutil

    src = tmp_path / "sharded"
    convert.hf_to_megallm(hf[0], tmp_path / "mg")
    convert.megallm_to_hf(tmp_path / "mg", src, max_shard_size=200_000)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    # a tensor the index does not list at all
    partial = tmp_path / "no_key"
    shutil.copytree(src, partial)
    del index["weight_map"]["model.layers.3.mlp.up_proj.weight"]
    (partial / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=r"model.safetensors.index.json: no tensor 'model.layers.3.mlp.up_proj"):
        convert.hf_to_megallm(partial, tmp_path / "o1")
    # a shard file that is gone
    victim = src / "model-00003-of-00006.safetensors"
    victim.unlink()
    with pytest.raises(ConversionError, match=r"model-00003-of-00006.safetensors: missing \(listed in .*index.json\)"):
        convert.hf_to_megallm(src, tmp_path / "o2")
    with pytest.raises(ConversionError, match=r"a megallm checkpoint, not a HuggingFace directory"):
        convert.hf_to_megallm(tmp_path / "mg", tmp_path / "o3")
    (tmp_path / "config_only").mkdir()
    shutil.copy(src / "config.json", tmp_path / "config_only")
    with pytest.raises(ConversionError, match=r"config_only: no model.safetensors.index.json, model.safetensors"):
        convert.hf_to_megallm(tmp_path / "config_only", tmp_path / "o4")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_failure_midway_leaves_no_output(hf, tmp_path, monkeypatch):
    from megallm.checkpoint import hf_files

    real_get = hf_files.HFWeights.get

    def failing_get(self, name):
        if name.startswith("model.layers.2."):
            raise OSError("disk went away")
        return real_get(self, name)

    monkeypatch.setattr(hf_files.HFWeights, "get", failing_get)
    with pytest.raises(OSError):
        convert.hf_to_megallm(hf[0], tmp_path / "mg")
    assert list((tmp_path / "mg").iterdir()) == []
    monkeypatch.setattr(hf_files.HFWeights, "get", real_get)
    convert.hf_to_megallm(hf[0], tmp_path / "mg")  # the same output directory is usable afterwards
    with pytest.raises(ConversionError, match="not empty"):
        convert.hf_to_megallm(hf[0], tmp_path / "mg")


def test_shard_planning_and_sizes():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1500") == 1500
    with pytest.raises(ConversionError, match="max shard size 'big'"):
        parse_size("big")
    assert plan_shards({"a": 40, "b": 40, "c": 100, "d": 10}, 90) == [["a", "b"], ["c"], ["d"]]


def _tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", "tools/convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_usage_and_input_errors_exit_2(hf, tmp_path, capsys):
    tool = _tool()
    assert tool.main(["--from", "megallm", "--to", "hf", "--input", "x", "--output", "y", "--tp", "2"]) == 2
    assert "--tp/--pp/--vpp describe megallm layouts" in capsys.readouterr().err
    assert tool.main(["--from", "hf", "--to", "megallm", "--input", str(hf[0]), "--output", str(tmp_path / "o"),
                      "--tp", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "config.json" in err and "num_key_value_heads" in err


def test_cli_runs_as_a_script(hf, tmp_path):
    proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "--from", "hf", "--to", "megallm",
                           "--input", str(hf[0]), "--output", str(tmp_path / "mg"), "--tp", "2", "--pp", "2"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--load" in proc.stdout and "39/39" in proc.stderr  # the progress bar counted every tensor
    assert checkpoint.read_meta(tmp_path / "mg" / "iter_0000000")["layout"]["tp"] == 2
