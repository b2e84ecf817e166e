"""A HuggingFace LLaMA converted to megallm gives HF's logits at every layout, loaded the way
`launch/pretrain_llama2.py --load` loads it; converted back, transformers loads it unchanged.

One 4-process torchrun runs all layouts (tp, pp) = (1,1), (2,1), (1,2), (2,2) (dp = 4 / (tp x pp))
and (2,2) with vpp 2, the last one produced by megallm -> megallm resharding. fp32 throughout;
differences come only from summation order (tp's partial sums), hence 1e-4 and not equality.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megallm import checkpoint
from megallm.checkpoint import convert
from tests.launch import torchrun
from tests.test_convert import hf, hf_logits, hf_weights  # noqa: F401 (hf is a fixture)

pytestmark = pytest.mark.slow

LAYOUTS = {"tp1_pp1": (1, 1, None), "tp2_pp1": (2, 1, None), "tp1_pp2": (1, 2, None), "tp2_pp2": (2, 2, None),
           "tp2_pp2_vpp2": (2, 2, 2)}


@pytest.fixture(scope="module")
def layouts(hf, tmp_path_factory):  # noqa: F811
    src, tokens, _ = hf
    tmp = tmp_path_factory.mktemp("layouts")
    runs = []
    for name, (tp, pp, vpp) in LAYOUTS.items():
        if vpp:
            convert.reshard(tmp / "tp2_pp2", tmp / name, tp=tp, pp=pp, vpp=vpp)
        else:
            convert.hf_to_megallm(src, tmp / name, tp=tp, pp=pp)
        runs.append({"name": name, "ckpt": str(tmp / name), "tp": tp, "pp": pp, "vpp": vpp})
    save_file({"tokens": tokens}, str(tmp / "tokens.safetensors"))
    (tmp / "spec.json").write_text(json.dumps({"tokens": str(tmp / "tokens.safetensors"), "out": str(tmp),
                                               "runs": runs}))
    torchrun(4, "tests/distributed/convert_worker.py", str(tmp / "spec.json"), timeout=600)
    return tmp


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_logits_match_huggingface(hf, layouts, name):  # noqa: F811
    _, _, expected = hf
    tp, pp, vpp = LAYOUTS[name]
    result = json.loads((layouts / f"{name}.json").read_text())
    # model-only: weights loaded, iteration 0, optimizer fresh (no Adam state yet)
    assert (result["loaded_iteration"], result["iteration"], result["optimizer_state"]) == (0, 0, 0)
    last_rank_layers = {(1, None): [[0, 1, 2, 3]], (2, None): [[2, 3]], (2, 2): [[1], [3]]}[(pp, vpp)]
    assert result["layers"] == last_rank_layers
    logits = load_file(str(layouts / f"{name}.safetensors"))["logits"]
    assert logits.shape == expected.shape
    diff = (logits - expected).abs().max().item()
    assert diff < 1e-4, f"{name}: logits differ from HuggingFace's by {diff}"


def test_converted_back_from_tp2_pp2_loads_in_transformers(hf, layouts, tmp_path):  # noqa: F811
    src, tokens, expected = hf
    out = convert.megallm_to_hf(layouts / "tp2_pp2_vpp2", tmp_path / "hf")
    original, back = hf_weights(src), hf_weights(out)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in original.items()}
    assert all(torch.equal(back[k], original[k]) for k in original)
    assert checkpoint.read_meta(layouts / "tp2_pp2_vpp2" / "iter_0000000")["layout"]["vpp"] == 2
    assert torch.equal(hf_logits(out, tokens), expected)
