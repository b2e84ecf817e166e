"""Typed run configuration: YAML sections of dataclasses, every field overridable by a flag.

Field names are Megatron-LM's (`micro_batch_size`, `tensor_model_parallel_size`, ...), and a field
`foo_bar` is set from the command line with `--foo-bar`, whatever section it lives in, so field
names are unique across sections.

    python -m megallm.config --config configs/llama2_70b.yaml --describe
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


@dataclass
class ModelConfig:
    num_layers: int = 4
    hidden_size: int = 128
    ffn_hidden_size: int = 352
    num_attention_heads: int = 8
    num_query_groups: int = 2
    vocab_size: int = 4096
    # Megatron pads the vocabulary to a multiple of this times tp; 1 keeps LLaMA2's 32000 exact
    # (32000 divides by 8), so checkpoints keep HuggingFace's shapes.
    make_vocab_size_divisible_by: int = 1
    max_position_embeddings: int = 128
    norm_epsilon: float = 1e-5
    rotary_base: float = 10000.0
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    untie_embeddings_and_output_weights: bool = True

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    # 1f1b, interleaved_1f1b (needs virtual stages), or zero_bubble (torch's ZBVZeroBubble-free
    # interleaved variant, ScheduleInterleavedZeroBubble)
    pipeline_schedule: str = "1f1b"
    use_distributed_optimizer: bool = False
    distributed_backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    distributed_timeout_minutes: int = 10


@dataclass
class TrainingConfig:
    micro_batch_size: int = 1
    global_batch_size: int = 16
    seq_length: int = 128
    train_iters: int = 100
    seed: int = 1234
    eval_interval: int = 0  # 0: no evaluation
    eval_iters: int = 4
    params_dtype: str = "auto"  # auto: fp32 on CPU, bf16 (fp32 master weights) on CUDA
    exit_signal_handler: bool = True


@dataclass
class OptimizerConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4
    lr_decay_style: str = "cosine"
    lr_warmup_fraction: Optional[float] = None
    lr_warmup_iters: int = 0
    lr_warmup_init: float = 0.0
    lr_decay_iters: Optional[int] = None  # default: train_iters
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class DataConfig:
    # Megatron style: [PREFIX] or [W1, PREFIX1, W2, PREFIX2, ...]; empty means synthetic data
    data_path: list = field(default_factory=list)
    split: str = "98,2,0"
    data_cache_path: Optional[str] = None
    tokenizer_model: Optional[str] = None
    exclude_samples: Optional[str] = None
    skip_data_check: bool = False
    num_workers: int = 0


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: int = 0
    save_keep: int = 0  # 0 keeps all
    keep_iteration: bool = False  # a model-only (converted) checkpoint starts at iteration 0


@dataclass
class SpikeConfig:
    spike_action: str = "skip"  # skip | rollback | warn | stop
    spike_window: int = 128
    spike_min_history: int = 32
    spike_zscore: float = 6.0
    spike_grad_zscore: float = 6.0
    spike_max_skips: int = 3
    spike_skip_window: int = 50
    spike_rollback_skip_samples: int = 0
    spike_max_rollbacks: int = 2
    # Suspect documents (training/forensics.py): a document segment whose mean loss lies more than
    # suspect_zscore robust standard deviations (1.4826 x MAD) from its iteration's median, either
    # way, is written to suspects-dp<R>.jsonl. 6 measured on the planted-junk Shakespeare run
    # (docs/spike_report.md, "Suspect documents"): no clean document above it.
    suspect_zscore: float = 6.0
    suspect_min_tokens: int = 32  # shorter segments are neither scored nor part of the reference
    suspect_window: int = 16  # iterations whose segments set the MAD (few segments per iteration)


@dataclass
class LoggingConfig:
    log_dir: str = "runs/default"
    log_interval: int = 1
    tensorboard: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    # Derived sizes. world_size is known only at launch; callers pass it.
    def data_parallel_size(self, world_size: int) -> int:
        p = self.parallel
        return world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)

    def num_micro_batches(self, world_size: int) -> int:
        t = self.training
        return t.global_batch_size // (t.micro_batch_size * self.data_parallel_size(world_size))

    @property
    def padded_vocab_size(self) -> int:
        m, tp = self.model, self.parallel.tensor_model_parallel_size
        multiple = m.make_vocab_size_divisible_by * tp
        return int(math.ceil(m.vocab_size / multiple) * multiple)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
ALIASES = {
    "tp": "tensor_model_parallel_size",
    "pp": "pipeline_model_parallel_size",
    "vpp": "virtual_pipeline_model_parallel_size",
}


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def _field_index() -> dict[str, tuple[str, dataclasses.Field, Any]]:
    """field name -> (section, field, python type). Names must be unique across sections."""
    index = {}
    for section, cls in _section_classes().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.name not in index, f"config field {f.name} appears in two sections"
            index[f.name] = (section, f, hints[f.name])
    return index


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, field and rule."""


def _base_type(tp: Any) -> Any:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union:
        non_none = [a for a in args if a is not type(None)]
        return non_none[0]
    return tp


def _coerce(name: str, value: Any, tp: Any, where: str) -> Any:
    base = _base_type(tp)
    if value is None:
        if base is not tp:  # Optional
            return None
        raise ConfigError(f"{where}: field '{name}' may not be null")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError(value)
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if base is float:
            return float(value)
        if base is list:
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else str(value).split()
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{where}: field '{name}' = {value!r} is not a valid {getattr(base, '__name__', base)}"
        ) from None


def load_yaml(path: str | Path, cfg: Optional[Config] = None) -> Config:
    """Apply a YAML file (sections named as in Config) on top of cfg (defaults if None)."""
    cfg = cfg or Config()
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    index = _field_index()
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section '{section}' (known: {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section '{section}' must be a mapping")
        for name, value in values.items():
            entry = index.get(name)
            if entry is None or entry[0] != section:
                hint = f" (it belongs in section '{entry[0]}')" if entry else ""
                raise ConfigError(f"{path}: unknown field '{section}.{name}'{hint}")
            setattr(getattr(cfg, section), name, _coerce(name, value, entry[2], str(path)))
    return cfg


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, named as Megatron names it; defaults are None (= not given)."""
    parser.add_argument("--config", help="YAML config file (sections as in megallm.config.Config)")
    for name, (_, f, tp) in _field_index().items():
        flags = ["--" + name.replace("_", "-")]
        flags += ["--" + a for a, target in ALIASES.items() if target == name]
        base = _base_type(tp)
        if base is bool:
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=None)
        elif base is list:
            parser.add_argument(*flags, dest=name, nargs="+", default=None)
        else:
            parser.add_argument(*flags, dest=name, default=None, metavar=base.__name__.upper())


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = load_yaml(args.config) if getattr(args, "config", None) else Config()
    for name in _field_index():
        value = getattr(args, name, None)
        if value is not None:
            apply_overrides(cfg, {name: value}, where="--" + name.replace("_", "-"))
    return cfg


def apply_overrides(cfg: Config, overrides: dict[str, Any], where: str = "overrides") -> Config:
    """Set fields by their flat (flag) names, e.g. {"tensor_model_parallel_size": 2, "tp": 2}."""
    index = _field_index()
    for name, value in overrides.items():
        name = ALIASES.get(name, name)
        if name not in index:
            raise ConfigError(f"{where}: unknown field '{name}'")
        section, _, tp = index[name]
        setattr(getattr(cfg, section), name, _coerce(name, value, tp, where))
    return cfg


def parse_config(argv: Optional[list[str]] = None, parser: Optional[argparse.ArgumentParser] = None):
    """Parse flags into (Config, Namespace). Extra arguments may be added to `parser` by callers."""
    parser = parser or argparse.ArgumentParser(description=__doc__)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return config_from_args(args), args
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------
# Validation: hard rules (errors) and known-bad hyperparameters (warnings)


def validate(cfg: Config, world_size: Optional[int] = None) -> list[str]:
    """Every violated rule as one line naming the field, its value and the rule."""
    m, p, t = cfg.model, cfg.parallel, cfg.training
    tp, pp, vpp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    errors = []

    def rule(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    positive = {
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "num_layers": m.num_layers,
        "hidden_size": m.hidden_size, "num_attention_heads": m.num_attention_heads,
        "num_query_groups": m.num_query_groups, "micro_batch_size": t.micro_batch_size,
        "global_batch_size": t.global_batch_size, "seq_length": t.seq_length,
    }
    for name, value in positive.items():
        rule(value >= 1, f"{name}={value}: must be at least 1")
    if errors:
        return errors
    rule(m.hidden_size % m.num_attention_heads == 0,
         f"hidden_size={m.hidden_size}: must be divisible by num_attention_heads={m.num_attention_heads}")
    rule(m.num_attention_heads % m.num_query_groups == 0,
         f"num_attention_heads={m.num_attention_heads}: must be divisible by num_query_groups={m.num_query_groups}")
    rule(m.num_attention_heads % tp == 0,
         f"num_attention_heads={m.num_attention_heads}: must be divisible by tensor_model_parallel_size={tp}")
    rule(m.num_query_groups % tp == 0,
         f"num_query_groups={m.num_query_groups}: must be divisible by tensor_model_parallel_size={tp} "
         f"(each tensor-parallel rank holds whole key/value groups)")
    rule(m.ffn_hidden_size % tp == 0,
         f"ffn_hidden_size={m.ffn_hidden_size}: must be divisible by tensor_model_parallel_size={tp}")
    rule(m.kv_channels % 2 == 0, f"hidden_size/num_attention_heads={m.kv_channels}: must be even for RoPE")
    chunks = pp * (vpp or 1)
    rule(m.num_layers % chunks == 0,
         f"num_layers={m.num_layers}: must be divisible by pipeline_model_parallel_size x "
         f"virtual_pipeline_model_parallel_size = {pp} x {vpp or 1}")
    if vpp is not None:
        rule(vpp >= 2, f"virtual_pipeline_model_parallel_size={vpp}: must be at least 2 (or unset)")
        rule(pp >= 2, f"virtual_pipeline_model_parallel_size={vpp}: needs pipeline_model_parallel_size >= 2, got {pp}")
    rule(p.pipeline_schedule in ("1f1b", "interleaved_1f1b", "zero_bubble", "gpipe"),
         f"pipeline_schedule={p.pipeline_schedule!r}: must be one of 1f1b, interleaved_1f1b, zero_bubble, gpipe")
    rule(t.seq_length <= m.max_position_embeddings,
         f"seq_length={t.seq_length}: must be at most max_position_embeddings={m.max_position_embeddings}")
    rule(cfg.padded_vocab_size % tp == 0,
         f"vocab_size={m.vocab_size}: padded size {cfg.padded_vocab_size} must divide by tensor_model_parallel_size={tp}")
    rule(cfg.spike.spike_action in ("skip", "rollback", "warn", "stop"),
         f"spike_action={cfg.spike.spike_action!r}: must be one of skip, rollback, warn, stop")
    rule(cfg.spike.spike_min_history <= cfg.spike.spike_window,
         f"spike_min_history={cfg.spike.spike_min_history}: must be at most spike_window={cfg.spike.spike_window}")
    rule(cfg.spike.suspect_zscore > 0 and cfg.spike.suspect_min_tokens >= 1 and cfg.spike.suspect_window >= 1,
         f"suspect_zscore={cfg.spike.suspect_zscore}, suspect_min_tokens={cfg.spike.suspect_min_tokens}, "
         f"suspect_window={cfg.spike.suspect_window}: must be positive")
    rule(cfg.optimizer.lr_decay_style in ("cosine", "linear", "constant"),
         f"lr_decay_style={cfg.optimizer.lr_decay_style!r}: must be one of cosine, linear, constant")
    rule(cfg.optimizer.min_lr <= cfg.optimizer.lr,
         f"min_lr={cfg.optimizer.min_lr}: must not exceed lr={cfg.optimizer.lr}")
    decay = cfg.optimizer.lr_decay_iters or t.train_iters
    rule(warmup_iters(cfg) < decay,
         f"lr_warmup_iters={warmup_iters(cfg)}: warmup must end before the decay does "
         f"(lr_decay_iters, default train_iters = {decay})")
    if cfg.spike.spike_action == "rollback":
        rule(bool(cfg.checkpoint.save) and cfg.checkpoint.save_interval > 0,
             "spike_action=rollback: needs --save DIR and --save-interval N > 0 (something to roll back to)")
    if world_size is not None:
        rule(world_size % (tp * pp) == 0,
             f"world size {world_size}: must be divisible by tensor_model_parallel_size x "
             f"pipeline_model_parallel_size = {tp} x {pp}")
        if world_size % (tp * pp) == 0:
            dp = cfg.data_parallel_size(world_size)
            rule(t.global_batch_size % (t.micro_batch_size * dp) == 0,
                 f"global_batch_size={t.global_batch_size}: must be divisible by micro_batch_size x "
                 f"data-parallel size = {t.micro_batch_size} x {dp}")
            if vpp is not None and t.global_batch_size % (t.micro_batch_size * dp) == 0:
                nmb = cfg.num_micro_batches(world_size)
                rule(nmb % pp == 0,
                     f"global_batch_size={t.global_batch_size}: the interleaved schedule needs the number of "
                     f"micro-batches ({nmb}) to be a multiple of pipeline_model_parallel_size={pp}")
    return errors


def lint_hyperparameters(cfg: Config) -> list[str]:
    """Settings that ran but hurt real 70B runs (see shared/REFERENCE.md): warnings, not errors."""
    o, m = cfg.optimizer, cfg.model
    warnings = []
    if o.adam_beta2 >= 0.99:
        warnings.append(f"adam_beta2={o.adam_beta2}: caused loss spikes in large runs; use 0.95")
    if o.adam_eps >= 1e-6:
        warnings.append(f"adam_eps={o.adam_eps}: 1e-6 or larger damps updates of rare parameters; use 1e-8")
    if m.hidden_dropout > 0 or m.attention_dropout > 0:
        warnings.append(f"hidden_dropout={m.hidden_dropout}, attention_dropout={m.attention_dropout}: "
                        "dropout is off in LLaMA2 pretraining; use 0.0")
    if warmup_iters(cfg) == 0:
        warnings.append("lr_warmup_iters=0 and no lr_warmup_fraction: no warmup; use lr_warmup_fraction 0.01")
    if o.weight_decay < 0.05:
        warnings.append(f"weight_decay={o.weight_decay}: too low was seen to spike in bf16; use 0.1")
    if o.lr > 1e-3:
        warnings.append(f"lr={o.lr}: above 1e-3 is far above LLaMA2's 1.5e-4 (70B) / 3e-4 (7B); "
                        "fine for tiny models, risky at scale")
    return warnings


def warmup_iters(cfg: Config) -> int:
    o = cfg.optimizer
    if o.lr_warmup_fraction is not None:
        return int(o.lr_warmup_fraction * (o.lr_decay_iters or cfg.training.train_iters))
    return o.lr_warmup_iters


# ----------------------------------------------------------------------------------------------
# Parameter counts (exact; the released LLaMA2 checkpoints are the check)


def layer_parameter_count(m: ModelConfig) -> int:
    kv_dim = m.num_query_groups * m.kv_channels
    attention = m.hidden_size * (m.hidden_size + 2 * kv_dim) + m.hidden_size * m.hidden_size
    mlp = 3 * m.hidden_size * m.ffn_hidden_size
    return attention + mlp + 2 * m.hidden_size  # two RMSNorm weights


def parameter_count(m: ModelConfig, vocab_size: Optional[int] = None) -> int:
    vocab = vocab_size or m.vocab_size
    embeddings = vocab * m.hidden_size * (2 if m.untie_embeddings_and_output_weights else 1)
    return embeddings + m.num_layers * layer_parameter_count(m) + m.hidden_size


def describe(cfg: Config, world_size: Optional[int] = None) -> str:
    lines = [yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(), ""]
    n = parameter_count(cfg.model)
    lines.append(f"parameters: {n:,}")
    if cfg.padded_vocab_size != cfg.model.vocab_size:
        lines.append(f"parameters with vocab padded to {cfg.padded_vocab_size} for "
                     f"tp={cfg.parallel.tensor_model_parallel_size}: "
                     f"{parameter_count(cfg.model, cfg.padded_vocab_size):,}")
    if world_size is not None:
        lines.append(f"data_parallel_size: {cfg.data_parallel_size(world_size)} (world size {world_size})")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Print a resolved megallm config and its parameter count.")
    parser.add_argument("--describe", action="store_true", help="print the resolved config and parameter count")
    parser.add_argument("--world-size", type=int, default=None, help="also validate for this many ranks")
    parser.add_argument("--stage", type=int, default=None, metavar="PP_RANK",
                        help="also build this pipeline rank's chunks on the meta device (no memory) and count "
                             "the parameters one of its tensor-parallel ranks holds")
    cfg, args = parse_config(argv, parser)
    errors = validate(cfg, args.world_size)
    print(describe(cfg, args.world_size))
    if args.stage is not None and not errors:
        from megallm.parallel.pipeline import build_stage_on_meta

        chunks = build_stage_on_meta(cfg, args.stage)
        layers = [n for c in chunks for n in c.layer_numbers]
        count = sum(p.numel() for c in chunks for p in c.parameters())
        print(f"pipeline rank {args.stage}: layers {layers[0]}..{layers[-1]}, {count:,} parameters per "
              f"tensor-parallel rank (tp={cfg.parallel.tensor_model_parallel_size}), built on the meta device")
    for w in lint_hyperparameters(cfg):
        print(f"warning: {w}")
    for e in errors:
        print(f"config error: {e}", file=sys.stderr)
    return 2 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
