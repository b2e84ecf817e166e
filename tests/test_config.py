"""Config loading, flag overrides, validation rules, hyperparameter lint and parameter counts."""

import subprocess
import sys

import pytest

from megallm.config import (
    Config,
    ConfigError,
    apply_overrides,
    lint_hyperparameters,
    load_yaml,
    parameter_count,
    parse_config,
    validate,
)

RELEASED = {"7b": 6_738_415_616, "13b": 13_015_864_320, "70b": 68_976_648_192}


@pytest.mark.parametrize("size", RELEASED)
def test_parameter_counts_match_released_checkpoints(size):
    assert parameter_count(load_yaml(f"configs/llama2_{size}.yaml").model) == RELEASED[size]


def test_describe_prints_counts():
    out = subprocess.run([sys.executable, "-m", "megallm.config", "--config", "configs/llama2_70b.yaml", "--describe"],
                         capture_output=True, text=True, check=True).stdout
    assert "parameters: 68,976,648,192" in out


def test_70b_recipe_matches_reference():
    cfg = load_yaml("configs/llama2_70b.yaml")
    m, p, t, o = cfg.model, cfg.parallel, cfg.training, cfg.optimizer
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size) == (8, 8)
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups) == \
        (80, 8192, 28672, 64, 8)
    assert (m.vocab_size, m.max_position_embeddings, m.norm_epsilon, m.rotary_base) == (32000, 4096, 1e-5, 10000)
    assert (t.micro_batch_size, t.global_batch_size, t.seq_length) == (2, 1024, 4096)
    assert (o.lr, o.min_lr, o.lr_warmup_fraction, o.weight_decay, o.clip_grad) == (1.5e-4, 1e-5, 0.01, 0.1, 1.0)
    assert (o.adam_beta1, o.adam_beta2, o.adam_eps) == (0.9, 0.95, 1e-8)
    assert m.hidden_dropout == m.attention_dropout == 0.0
    assert validate(cfg, 64) == [] and lint_hyperparameters(cfg) == []


def test_flags_override_yaml_with_megatron_names_and_aliases():
    cfg, _ = parse_config(["--config", "configs/tiny.yaml", "--tp", "2", "--pipeline-model-parallel-size", "4",
                           "--micro-batch-size", "2", "--lr", "1e-4", "--use-distributed-optimizer",
                           "--data-path", "0.7", "A", "0.3", "B"])
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.parallel.pipeline_model_parallel_size == 4
    assert cfg.training.micro_batch_size == 2 and cfg.optimizer.lr == 1e-4
    assert cfg.parallel.use_distributed_optimizer is True
    assert cfg.data.data_path == ["0.7", "A", "0.3", "B"]


def test_unknown_yaml_field_names_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: 64\n  micro_batch_size: 2\n")
    with pytest.raises(ConfigError,
                       match=r"bad.yaml: unknown field 'model.micro_batch_size' \(it belongs in section 'training'\)"):
        load_yaml(bad)
    bad.write_text("model:\n  hidden_size: sixty\n")
    with pytest.raises(ConfigError, match="hidden_size.*not a valid int"):
        load_yaml(bad)


def test_bad_flag_value_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(["--micro-batch-size", "two"])
    assert e.value.code == 2
    assert "--micro-batch-size" in capsys.readouterr().err


RULES = [
    ({"num_attention_heads": 6, "num_query_groups": 2, "tp": 4},
     "num_attention_heads=6: must be divisible by tensor_model_parallel_size=4"),
    ({"num_query_groups": 2, "tp": 4}, "num_query_groups=2: must be divisible by tensor_model_parallel_size=4"),
    ({"num_layers": 6, "pp": 4}, "num_layers=6: must be divisible by pipeline_model_parallel_size"),
    ({"num_layers": 4, "pp": 2, "vpp": 4}, "num_layers=4: must be divisible by pipeline_model_parallel_size x virtual"),
    ({"global_batch_size": 12, "micro_batch_size": 2},
     "global_batch_size=12: must be divisible by micro_batch_size x data-parallel size = 2 x 8"),
    ({"seq_length": 256}, "seq_length=256: must be at most max_position_embeddings=128"),
    ({"tp": 3, "num_attention_heads": 6, "num_query_groups": 3, "hidden_size": 96, "ffn_hidden_size": 96},
     "world size 8: must be divisible by tensor_model_parallel_size"),
    ({"hidden_size": 100}, "hidden_size=100: must be divisible by num_attention_heads=8"),
    ({"num_query_groups": 3}, "num_attention_heads=8: must be divisible by num_query_groups=3"),
    ({"ffn_hidden_size": 353, "tp": 2}, "ffn_hidden_size=353: must be divisible by tensor_model_parallel_size=2"),
    ({"vpp": 2, "pp": 1}, "needs pipeline_model_parallel_size >= 2"),
    ({"pp": 2, "vpp": 2, "global_batch_size": 6, "tp": 2}, "number of micro-batches (3) to be a multiple"),
    ({"spike_action": "ignore"}, "spike_action='ignore': must be one of"),
    ({"spike_action": "rollback"}, "spike_action=rollback: needs --save DIR"),
    ({"lr_warmup_iters": 500, "train_iters": 100}, "lr_warmup_iters=500: warmup must end before the decay"),
    ({"min_lr": 1.0}, "min_lr=1.0: must not exceed lr"),
    ({"micro_batch_size": 0}, "micro_batch_size=0: must be at least 1"),
]


@pytest.mark.parametrize("overrides,message", RULES)
def test_validation_rule(overrides, message):
    cfg = apply_overrides(load_yaml("configs/tiny.yaml"), overrides)
    errors = validate(cfg, world_size=8)
    assert any(message in e for e in errors), errors


def test_tiny_config_valid_on_1_to_8_ranks():
    for world, tp, pp in [(1, 1, 1), (2, 1, 2), (4, 2, 1), (8, 2, 2), (8, 2, 4), (8, 1, 1)]:
        cfg = apply_overrides(load_yaml("configs/tiny.yaml"), {"tp": tp, "pp": pp})
        assert validate(cfg, world) == [], (world, tp, pp)


LINT = [
    ({"adam_beta2": 0.999}, "adam_beta2=0.999 > 0.95", "use adam_beta2 0.95"),
    ({"adam_eps": 1e-5}, "adam_eps=1e-05", "use adam_eps 1e-8"),
    ({"hidden_dropout": 0.1}, "hidden_dropout=0.1", "use hidden_dropout and attention_dropout 0.0"),
    ({"lr_warmup_iters": 0, "lr_warmup_fraction": None}, "no warmup", "lr_warmup_fraction 0.01"),
    ({"weight_decay": 0.01}, "weight_decay=0.01", "use weight_decay 0.1"),
    ({"lr": 5e-3}, "lr=0.005 > 0.00045", "published lr 0.00015"),
]


@pytest.mark.parametrize("overrides,setting,advice", LINT)
def test_lint_warns_on_known_bad_hyperparameters(overrides, setting, advice):
    cfg = apply_overrides(load_yaml("configs/llama2_70b.yaml"), overrides)
    warnings = lint_hyperparameters(cfg)
    assert len(warnings) == 1 and setting in warnings[0] and advice in warnings[0], warnings


def test_launcher_refuses_bad_config_before_any_process_group():
    proc = subprocess.run([sys.executable, "launch/pretrain_llama2.py", "--config", "configs/tiny.yaml",
                           "--tp", "3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "config error: num_attention_heads=8: must be divisible by tensor_model_parallel_size=3" in proc.stderr


def test_70b_stage_builds_on_meta_device():
    out = subprocess.run([sys.executable, "-m", "megallm.describe", "--config", "configs/llama2_70b.yaml",
                          "--stage", "3"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    # 10 layers x (855,638,016 sharded / 8 + 16,384 replicated norm weights) = 1,069,711,360
    assert "pipeline rank 3: layers 30..39, 1,069,711,360 parameters per tensor-parallel rank (tp=8)" in out


def test_padded_vocab_is_labelled():
    cfg = apply_overrides(Config(), {"vocab_size": 32001, "make_vocab_size_divisible_by": 128, "tp": 8})
    assert cfg.padded_vocab_size == 32768  # next multiple of 128 x 8


def test_every_field_is_documented_and_shown_by_help():
    """torchtitan's style: the string under each field is its documentation, and --help shows it."""
    import argparse
    import dataclasses
    import typing

    from megallm.config import add_config_arguments, field_docs

    missing = []
    for section, cls in typing.get_type_hints(Config).items():
        docs = field_docs(cls)
        missing += [f"{section}.{f.name}" for f in dataclasses.fields(cls) if f.name not in docs]
    assert missing == [], missing
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    assert "Also write TensorBoard event files." in parser.format_help()


def test_pipeline_schedule_auto_follows_the_virtual_pipeline_size():
    cfg = apply_overrides(load_yaml("configs/tiny.yaml"), {"pp": 2})
    assert cfg.parallel.resolved_pipeline_schedule == "1f1b" and validate(cfg, 2) == []
    cfg = apply_overrides(cfg, {"vpp": 2})
    assert cfg.parallel.resolved_pipeline_schedule == "interleaved_1f1b" and validate(cfg, 2) == []
    assert validate(apply_overrides(cfg, {"pipeline_schedule": "zero_bubble"}), 2) == []
    assert "pipeline_schedule=gpipe" in validate(apply_overrides(cfg, {"pipeline_schedule": "gpipe"}), 2)[0]
