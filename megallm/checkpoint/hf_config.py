"""HuggingFace `config.json` <-> megallm's ModelConfig, for LLaMA-architecture models only.

Anything our model would silently compute differently is refused with the key that says so:
a tied head, RoPE scaling, biases, another activation, a head size other than hidden / heads.
Both transformers 4.x keys (`rope_theta`, `rope_scaling`, `torch_dtype`) and 5.x ones
(`rope_parameters`, `dtype`) are read; 4.x keys are written, which 5.x still reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from megallm.config import ModelConfig

# megallm field -> HuggingFace key, for error messages that must name the key in config.json
HF_KEYS = {
    "num_layers": "num_hidden_layers", "hidden_size": "hidden_size", "ffn_hidden_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads", "num_query_groups": "num_key_value_heads",
    "vocab_size": "vocab_size", "max_position_embeddings": "max_position_embeddings",
    "norm_epsilon": "rms_norm_eps", "rotary_base": "rope_theta",
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
# LLaMA's SentencePiece ids, written when the source never said otherwise
LLAMA_TOKEN_IDS = {"bos_token_id": 1, "eos_token_id": 2}


class ConversionError(ValueError):
    """Input that cannot be converted; the message names the file and key."""


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return data


def _rope_theta(hf: dict, where: str) -> float:
    params = hf.get("rope_parameters")
    if params:  # transformers 5
        if params.get("rope_type", "default") != "default":
            raise ConversionError(f"{where}: rope_parameters.rope_type={params['rope_type']!r}: only plain RoPE "
                                  "(LLaMA2) is supported, not scaled variants")
        return float(params.get("rope_theta", 10000.0))
    if hf.get("rope_scaling"):
        raise ConversionError(f"{where}: rope_scaling={hf['rope_scaling']!r}: only plain RoPE (LLaMA2) is supported; "
                              "scaled RoPE (LLaMA 3.1, long-context variants) would give different logits")
    return float(hf.get("rope_theta", 10000.0))


def model_config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """A LLaMA config.json -> ModelConfig, or ConversionError naming the offending key."""
    if hf.get("model_type") != "llama":
        raise ConversionError(f"{where}: model_type={hf.get('model_type')!r}: only 'llama' (LlamaForCausalLM) "
                              "checkpoints can be converted")
    refusals = [
        ("tie_word_embeddings", bool(hf.get("tie_word_embeddings", False)),
         "megallm's output layer is untied from the embedding (LLaMA2); "
         "set it false only if the weights really differ"),
        ("attention_bias", bool(hf.get("attention_bias", False)), "the model has no attention biases"),
        ("mlp_bias", bool(hf.get("mlp_bias", False)), "the model has no MLP biases"),
        ("hidden_act", hf.get("hidden_act", "silu") != "silu", "the MLP is SwiGLU (silu)"),
    ]
    for key, bad, why in refusals:
        if bad:
            raise ConversionError(f"{where}: {key}={hf.get(key)!r} is not "
                                  f"supported: {why}")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(hf.get(key), int) or hf[key] < 1:
            raise ConversionError(f"{where}: {key}={hf.get(key)!r}: expected a positive integer")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if hf["hidden_size"] % heads or head_dim != hf["hidden_size"] // heads:
        raise ConversionError(f"{where}: head_dim={head_dim} with hidden_size={hf['hidden_size']} and "
                              f"num_attention_heads={heads}: the model needs head_dim = hidden_size / heads")
    return ModelConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"], ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads, num_query_groups=hf.get("num_key_value_heads") or heads,
        vocab_size=hf["vocab_size"], max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)), rotary_base=_rope_theta(hf, where),
        init_method_std=float(hf.get("initializer_range", 0.02)), untie_embeddings_and_output_weights=True)


def hf_config_from_model(m: ModelConfig, dtype: str, token_ids: Optional[dict] = None) -> dict:
    """LlamaConfig fields of a megallm model, as LLaMA2's released config.json spells them."""
    if not m.untie_embeddings_and_output_weights:
        raise ConversionError("untie_embeddings_and_output_weights=false: tied heads are not exported")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": m.hidden_size, "intermediate_size": m.ffn_hidden_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads, "num_key_value_heads": m.num_query_groups,
        "head_dim": m.kv_channels, "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": m.norm_epsilon, "rope_theta": m.rotary_base, "rope_scaling": None,
        "vocab_size": m.vocab_size, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": False, "initializer_range": m.init_method_std, "pretraining_tp": 1,
        "use_cache": True, "torch_dtype": DTYPES[dtype], **(token_ids or LLAMA_TOKEN_IDS),
    }


def token_ids_of(hf: dict) -> dict:
    """The special-token ids of a source config.json, kept so a round trip does not change them."""
    return {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}


def generation_config(token_ids: Optional[dict] = None) -> dict:
    return {"_from_model_config": True, **(token_ids or LLAMA_TOKEN_IDS)}
