"""Typed run configuration: YAML sections of dataclasses, every field overridable by a flag.

Field names are Megatron-LM's (`micro_batch_size`, `tensor_model_parallel_size`, ...), and a field
`foo_bar` is set from the command line with `--foo-bar`, whatever section it lives in, so field
names are unique across sections. Every field is documented by the string under it (also shown
by `--help`), and is either read by the code or refused by validate() with the reason.

    python -m megallm.describe --config configs/llama2_70b.yaml
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from megallm.data.blend import DataConfigError, parse_blend


@dataclass
class ModelConfig:
    """The LLaMA2 architecture (RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases)."""

    num_layers: int = 4
    """Transformer layers (LLaMA2: 32 / 40 / 80 for 7B / 13B / 70B)."""
    hidden_size: int = 128
    """Width of the residual stream (LLaMA2-70B: 8192)."""
    ffn_hidden_size: int = 352
    """Inner width of the SwiGLU MLP (LLaMA2-70B: 28672)."""
    num_attention_heads: int = 8
    """Query heads; hidden_size / num_attention_heads is the head size (even, for RoPE)."""
    num_query_groups: int = 2
    """Key/value heads of grouped-query attention (LLaMA2-70B: 8; = num_attention_heads for plain
    multi-head attention, as in LLaMA2-7B/13B)."""
    vocab_size: int = 4096
    """Tokenizer vocabulary (LLaMA2: 32000); every token id in the data must be below it."""
    # Megatron pads the vocabulary to a multiple of this times tp; 1 keeps LLaMA2's 32000 exact
    # (32000 divides by 8), so checkpoints keep HuggingFace's shapes.
    make_vocab_size_divisible_by: int = 1
    """Pad the embedding/output rows to a multiple of this x tensor_model_parallel_size."""
    max_position_embeddings: int = 128
    """Longest sequence the model is built for (LLaMA2: 4096); seq_length may not exceed it."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    rotary_base: float = 10000.0
    """RoPE base frequency (theta)."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP; LLaMA2 pretrains without (0.0)."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities; LLaMA2 pretrains without (0.0)."""
    init_method_std: float = 0.02
    """Std of the normal initialisation of the weights."""
    untie_embeddings_and_output_weights: bool = True
    """LLaMA2 keeps the input embedding and the output layer as separate weights; the model
    supports only that, so false is refused (a tied model would not match the parameter count)."""

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads


# pipeline_schedule values: which torch.distributed.pipelining schedule runs, by whether the
# pipeline ranks hold one model chunk or several (virtual_pipeline_model_parallel_size).
SCHEDULES_ONE_CHUNK = ("1f1b", "gpipe")
SCHEDULES_INTERLEAVED = ("interleaved_1f1b", "zero_bubble")


@dataclass
class ParallelConfig:
    """How the ranks split the model: tp x pp x dp = world size (dp is what is left)."""

    tensor_model_parallel_size: int = 1
    """Ranks that split every layer's matrices (Megatron's column/row-parallel linears); flag --tp."""
    pipeline_model_parallel_size: int = 1
    """Ranks that hold consecutive groups of layers; flag --pp."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Model chunks per pipeline rank for the interleaved schedules (unset: one chunk); flag --vpp."""
    pipeline_schedule: str = "auto"
    """auto: 1f1b, or interleaved_1f1b with virtual_pipeline_model_parallel_size. One chunk per
    rank: 1f1b or gpipe (all forwards, then all backwards). Several: interleaved_1f1b (Megatron's
    interleaved schedule) or zero_bubble (torch's ScheduleInterleavedZeroBubble). Any other
    combination is refused."""
    use_distributed_optimizer: bool = False
    """Shard the optimizer state over the data-parallel ranks (ZeRO-1)."""
    ddp_bucket_size: Optional[int] = None
    """Megatron's --ddp-bucket-size: elements per gradient bucket. Each model chunk's parameters are
    cut, last layers first and never inside a parameter, into buckets of at least this many elements
    (the last one may hold fewer), each reduced and sharded over data parallel on its own. Unset:
    one bucket per chunk, or max(40M, 1M x dp) elements with overlap_grad_reduce (Megatron's)."""
    overlap_grad_reduce: bool = False
    """Megatron's --overlap-grad-reduce: start a bucket's all-reduce (reduce-scatter with the
    distributed optimizer) during backward, as soon as every parameter in it has its last
    micro-batch's gradient; the result is bitwise that of reducing after backward. Not with the
    zero_bubble schedule, whose weight gradients bypass the accumulation hooks."""
    overlap_param_gather: bool = False
    """Megatron's --overlap-param-gather (with use_distributed_optimizer): the step starts the
    weights' all-gathers without waiting; each model chunk waits for its own before its next
    forward, and a checkpoint save or load before it reads or writes the weights."""
    distributed_backend: str = "auto"
    """auto: nccl on CUDA, gloo on CPU; or nccl, gloo."""
    distributed_timeout_minutes: int = 10
    """How long a collective may wait for a peer before the run fails."""
    sequence_parallel: bool = False
    """Megatron's --sequence-parallel: norms, dropout and residual adds on [s/tp, b, h] shards
    (all-gather before the column-parallel GEMMs, reduce-scatter after the row-parallel ones);
    off at tp 1, where there is nothing to split."""

    @property
    def resolved_pipeline_schedule(self) -> str:
        if self.pipeline_schedule != "auto":
            return self.pipeline_schedule
        return "interleaved_1f1b" if self.virtual_pipeline_model_parallel_size else "1f1b"


@dataclass
class TrainingConfig:
    """Batch sizes, sequence length and run length."""

    micro_batch_size: int = 1
    """Sequences one rank runs through the model at once."""
    global_batch_size: int = 16
    """Sequences per optimizer step, over all data-parallel ranks and micro-batches."""
    seq_length: int = 128
    """Tokens per training sequence."""
    train_iters: int = 100
    """Optimizer steps of the whole run (a resumed run continues up to this)."""
    seed: int = 1234
    """Seed of the initialisation, the data shuffle and the synthetic data."""
    eval_interval: int = 0  # 0: no evaluation
    """Iterations between validation losses; 0: no evaluation."""
    eval_iters: int = 4
    """Global batches of the validation split each evaluation reads."""
    params_dtype: str = "auto"
    """Parameter and activation dtype: auto is fp32 on CPU and bf16 on CUDA; bf16 keeps fp32 main
    grads, masters and moments."""
    exit_signal_handler: bool = True
    """Save a checkpoint (with --save) and stop cleanly on SIGTERM or SIGINT (a scheduler's preemption)."""
    bf16: bool = False
    """Megatron's --bf16: bf16 parameters and activations, fp32 main grads, master weights and Adam moments
    (the same as params_dtype bf16, which params_dtype auto picks on CUDA)."""
    recompute_granularity: Optional[str] = None
    """Activation recompute (megallm/model/recompute.py). None: keep everything for backward;
    full: keep only checkpointed layers' inputs and re-run them; selective: re-run recompute_modules."""
    recompute_method: Optional[str] = None
    """Full recompute only: uniform (layers in groups of recompute_num_layers) or block (the first
    recompute_num_layers layers of each pipeline chunk)."""
    recompute_num_layers: Optional[int] = None
    """Full recompute only: the group size (uniform) or the number of checkpointed layers per chunk (block)."""
    recompute_modules: list = field(default_factory=lambda: ["layernorm", "swiglu"])
    """Selective recompute only: any of layernorm, swiglu (the activation), mlp (the whole MLP)."""


@dataclass
class OptimizerConfig:
    """AdamW with warmup and decay of the learning rate (Megatron's OptimizerParamScheduler)."""

    lr: float = 3e-3
    """Peak learning rate, reached at the end of warmup (LLaMA2-70B: 1.5e-4)."""
    min_lr: float = 3e-4
    """Learning rate at the end of the decay (LLaMA2: lr / 10)."""
    lr_decay_style: str = "cosine"
    """cosine, linear or constant."""
    lr_warmup_fraction: Optional[float] = None
    """Warmup as a fraction of lr_decay_iters; overrides lr_warmup_iters when set."""
    lr_warmup_iters: int = 0
    """Iterations of linear warmup from lr_warmup_init to lr."""
    lr_warmup_init: float = 0.0
    """Learning rate at iteration 0."""
    lr_decay_iters: Optional[int] = None  # default: train_iters
    """Iterations over which the learning rate decays to min_lr (default: train_iters)."""
    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW), not applied to norms."""
    adam_beta1: float = 0.9
    """AdamW's first-moment decay."""
    adam_beta2: float = 0.95
    """AdamW's second-moment decay (LLaMA2: 0.95)."""
    adam_eps: float = 1e-8
    """AdamW's epsilon."""
    clip_grad: float = 1.0
    """Largest global gradient norm; larger gradients are scaled down to it. 0 turns clipping off
    (as in Megatron)."""


@dataclass
class DataConfig:
    """Where the training tokens come from (Megatron's indexed .bin/.idx datasets)."""

    # Megatron style: [PREFIX] or [W1, PREFIX1, W2, PREFIX2, ...]; empty means synthetic data
    data_path: list = field(default_factory=list)
    """PREFIX ... or W1 PREFIX1 W2 PREFIX2 ... (a blend; weights are normalised); each PREFIX names
    PREFIX.bin and PREFIX.idx. Empty: seeded synthetic tokens."""
    split: str = "98,2,0"
    """Share of each dataset's documents for train,valid,test (Megatron's --split)."""
    data_cache_path: Optional[str] = None
    """Where megatron keeps its sample index caches (default: beside the first dataset)."""
    tokenizer_model: Optional[str] = None
    """SentencePiece model the data was tokenized with; checked against vocab_size before start."""
    exclude_samples: Optional[str] = None
    """File of dataset sample indices never to train on (tools/spike_report.py --skip-list)."""
    skip_data_check: bool = False
    """Skip the full token check of the data before start (existence and headers are still checked)."""


@dataclass
class CheckpointConfig:
    """Saving and resuming."""

    save: Optional[str] = None
    """Directory for checkpoints (iter_NNNNNNN/ and latest_checkpointed_iteration.txt)."""
    load: Optional[str] = None
    """Checkpoint directory to resume from; a directory without checkpoints starts from scratch."""
    save_interval: int = 0
    """Iterations between checkpoints; 0: only on a stop signal."""
    save_keep: int = 0  # 0 keeps all
    """Newest checkpoints to keep; 0 keeps all."""
    keep_iteration: bool = False  # a model-only (converted) checkpoint starts at iteration 0
    """Continue the iteration count of a model-only (converted) checkpoint instead of starting at 0."""
    async_save: bool = False
    """Megatron's --async-save: write checkpoint files on a background thread; the loop pays only for
    the host copy of this rank's shards, and `latest` moves once every rank's files are written and hashed."""


@dataclass
class SpikeConfig:
    """The loss-spike detector and what it does (megallm/training/spikes.py)."""

    spike_action: str = "skip"  # skip | rollback | warn | stop
    """skip the step, rollback to the last checkpoint, warn only, or stop the run. A NaN/Inf loss or
    gradient is skipped under warn too (its update would make every weight NaN)."""
    spike_window: int = 128
    """Recent accepted iterations the loss and grad-norm statistics are taken over."""
    spike_min_history: int = 32
    """Accepted iterations in the window before any spike is called."""
    spike_zscore: float = 5.0
    """Robust z-score of spike_method above which the loss is a spike (5 chosen on bench/results/spikes.md)."""
    spike_grad_zscore: float = 10.0
    """Robust z-score above which the grad norm is a spike (heavy-tailed at small batches: 6 skipped clean steps)."""
    spike_max_skips: int = 3
    """More spikes than this within spike_skip_window iterations persist: rollback (with
    spike_action=rollback) or re-baseline the detector (with skip)."""
    spike_skip_window: int = 50
    """Iterations over which spike_max_skips counts."""
    spike_rollback_skip_samples: int = 0
    """Samples a rollback steps over beyond the batch that spiked."""
    spike_max_rollbacks: int = 2
    """Rollbacks after which the run stops."""
    spike_method: str = "ema"
    """The detector's statistic (megallm/training/spikes.py, chosen on bench/results/spikes.md):
    ema, trend, mad, meanstd, olmo or megatron."""
    spike_log_loss: bool = True
    """Judge log(loss) and log(grad norm): a spike is a ratio."""
    spike_suspicious_zscore: float = 3.0
    """A value above this z (but under spike_zscore) enters the window clipped to it, so a missed
    spike cannot widen the spread that the next one is judged against."""
    suspect_zscore: float = 6.0
    """Suspect documents (megallm/training/forensics.py): a document segment whose mean loss lies more than
    this many robust standard deviations (1.4826 x MAD) from its iteration's median, either way, is
    written to suspects-dp<R>.jsonl. 6 measured on the planted-junk run (docs/spike_report.md)."""
    suspect_min_tokens: int = 32
    """Shorter segments are neither scored nor part of the reference."""
    suspect_window: int = 16
    """Iterations whose segments set the MAD (one rank holds few segments per iteration)."""


@dataclass
class LoggingConfig:
    """Metrics files, console and TensorBoard."""

    log_dir: str = "runs/default"
    """metrics.jsonl, spikes.jsonl, events.jsonl and tensorboard/ (what tools/spike_report.py reads)."""
    log_interval: int = 1
    """Iterations between progress lines on the console."""
    tensorboard: bool = True
    """Also write TensorBoard event files."""


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


# Fields megallm once had and no longer reads: a config naming one is refused with the reason.
REMOVED_FIELDS = {
    "num_workers": "megallm reads samples in the training process (no DataLoader workers); remove the field",
}


def field_docs(cls: type) -> dict[str, str]:
    """The string under each field of a config dataclass (torchtitan's style), for --help."""
    docs, body = {}, ast.parse(inspect.getsource(cls)).body[0].body
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


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
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config file ({getattr(e, 'strerror', None) or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or 'parse error'})") from None
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
            if name in REMOVED_FIELDS:
                raise ConfigError(f"{path}: field '{section}.{name}' is not supported: {REMOVED_FIELDS[name]}")
            if entry is None or entry[0] != section:
                hint = f" (it belongs in section '{entry[0]}')" if entry else ""
                raise ConfigError(f"{path}: unknown field '{section}.{name}'{hint}")
            setattr(getattr(cfg, section), name, _coerce(name, value, entry[2], str(path)))
    return cfg


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, named as Megatron names it; defaults are None (= not given)."""
    parser.add_argument("--config", help="YAML config file (sections as in megallm.config.Config)")
    docs = {name: doc for cls in _section_classes().values() for name, doc in field_docs(cls).items()}
    for name, (_, _, tp) in _field_index().items():
        flags = ["--" + name.replace("_", "-")]
        flags += ["--" + a for a, target in ALIASES.items() if target == name]
        base, doc = _base_type(tp), docs.get(name, "").replace("%", "%%")
        if base is bool:
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=None, help=doc)
        elif base is list:
            parser.add_argument(*flags, dest=name, nargs="+", default=None, help=doc)
        else:
            parser.add_argument(*flags, dest=name, default=None, metavar=base.__name__.upper(), help=doc)


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
        if name in REMOVED_FIELDS:
            raise ConfigError(f"{where}: field '{name}' is not supported: {REMOVED_FIELDS[name]}")
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


def validate_recompute(t: TrainingConfig) -> list[str]:
    """Megatron's rules for the recompute flags."""
    granularity, method, n = t.recompute_granularity, t.recompute_method, t.recompute_num_layers
    if granularity not in (None, "full", "selective"):
        return [f"recompute_granularity={granularity!r}: must be full or selective (or unset)"]
    if granularity == "full":
        errors = []
        if method not in ("uniform", "block"):
            errors.append(f"recompute_method={method!r}: recompute_granularity=full needs --recompute-method "
                          f"uniform or block")
        if n is None or n < 1:
            errors.append(f"recompute_num_layers={n}: recompute_granularity=full needs --recompute-num-layers N >= 1")
        return errors
    if method is not None or n is not None:
        return [f"recompute_method={method!r}, recompute_num_layers={n}: only for recompute_granularity=full "
                f"(got {granularity!r})"]
    known = ("layernorm", "swiglu", "mlp")
    unknown = [name for name in t.recompute_modules if name not in known]
    if unknown:
        return [f"recompute_modules={t.recompute_modules}: unknown {unknown}; choose from {', '.join(known)}"]
    return []


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
    rule(t.params_dtype in ("auto", "fp32", "bf16"),
         f"params_dtype={t.params_dtype!r}: must be auto, fp32 or bf16 "
         "(fp16 would need loss scaling, which megallm lacks)")
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
    schedules = ("auto",) + SCHEDULES_ONE_CHUNK + SCHEDULES_INTERLEAVED
    rule(p.pipeline_schedule in schedules,
         f"pipeline_schedule={p.pipeline_schedule!r}: must be one of {', '.join(schedules)}")
    if vpp is not None and p.pipeline_schedule in SCHEDULES_ONE_CHUNK:
        errors.append(f"pipeline_schedule={p.pipeline_schedule}: runs one model chunk per pipeline rank, but "
                      f"virtual_pipeline_model_parallel_size={vpp} asks for {vpp}; use --pipeline-schedule "
                      f"interleaved_1f1b or zero_bubble, or leave --vpp unset")
    if vpp is None and p.pipeline_schedule in SCHEDULES_INTERLEAVED:
        errors.append(f"pipeline_schedule={p.pipeline_schedule}: interleaves several model chunks per pipeline "
                      f"rank; set --virtual-pipeline-model-parallel-size (2 or more), or use 1f1b or gpipe")
    rule(p.ddp_bucket_size is None or p.ddp_bucket_size >= 1,
         f"ddp_bucket_size={p.ddp_bucket_size}: must be at least 1 element (or unset)")
    rule(not (p.overlap_grad_reduce and p.pipeline_schedule == "zero_bubble"),
         "overlap_grad_reduce=true with pipeline_schedule=zero_bubble: that schedule writes weight gradients "
         "outside the accumulation hooks, so no bucket is known complete during backward; use interleaved_1f1b "
         "or drop --overlap-grad-reduce")
    rule(not p.overlap_param_gather or p.use_distributed_optimizer,
         "overlap_param_gather=true: needs use_distributed_optimizer (without it the weights are stepped on "
         "every rank and there is no all-gather to overlap)")
    rule(p.distributed_backend in ("auto", "nccl", "gloo"),
         f"distributed_backend={p.distributed_backend!r}: must be one of auto, nccl, gloo")
    rule(m.untie_embeddings_and_output_weights,
         "untie_embeddings_and_output_weights=false: LLaMA2 keeps separate input embedding and output "
         "weights and megallm's model supports only that; remove the field (or set it to true)")
    rule(cfg.optimizer.clip_grad >= 0,
         f"clip_grad={cfg.optimizer.clip_grad}: must be positive (the largest gradient norm), or 0 for no clipping")
    rule(cfg.logging.log_interval >= 1, f"log_interval={cfg.logging.log_interval}: must be at least 1")
    rule(cfg.checkpoint.save_interval >= 0, f"save_interval={cfg.checkpoint.save_interval}: must be 0 or more")
    rule(t.eval_interval >= 0, f"eval_interval={t.eval_interval}: must be 0 (no evaluation) or more")
    rule(t.eval_interval == 0 or t.eval_iters >= 1,
         f"eval_iters={t.eval_iters}: must be at least 1 when eval_interval={t.eval_interval} evaluates")
    rule(t.train_iters >= 0, f"train_iters={t.train_iters}: must be 0 or more")
    split_error = _split_error(cfg.data.split)
    rule(split_error is None, f"split={cfg.data.split!r}: {split_error}")
    try:
        parse_blend(list(cfg.data.data_path))
    except DataConfigError as e:
        errors.append(str(e))
    rule(t.seq_length <= m.max_position_embeddings,
         f"seq_length={t.seq_length}: must be at most max_position_embeddings={m.max_position_embeddings}")
    rule(cfg.padded_vocab_size % tp == 0,
         f"vocab_size={m.vocab_size}: padded size {cfg.padded_vocab_size} must divide by "
         f"tensor_model_parallel_size={tp}")
    if p.sequence_parallel and tp > 1:
        rule(t.seq_length % tp == 0, f"seq_length={t.seq_length}: sequence_parallel splits the sequence over "
                                     f"tensor_model_parallel_size={tp}, so it must divide by it")
    rule(cfg.spike.spike_action in ("skip", "rollback", "warn", "stop"),
         f"spike_action={cfg.spike.spike_action!r}: must be one of skip, rollback, warn, stop")
    rule(cfg.spike.spike_method in ("ema", "trend", "mad", "meanstd", "olmo", "megatron"),
         f"spike_method={cfg.spike.spike_method!r}: must be one of ema, trend, mad, meanstd, olmo, megatron")
    rule(0 < cfg.spike.spike_suspicious_zscore <= cfg.spike.spike_zscore,
         f"spike_suspicious_zscore={cfg.spike.spike_suspicious_zscore}: must be in (0, spike_zscore]")
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
    errors += validate_recompute(t)
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


def _split_error(split: str) -> Optional[str]:
    """Megatron's --split: up to three non-negative numbers (train, valid, test) joined by ',' or '/',
    not all zero. None when valid, else what is wrong."""
    parts = [s.strip() for s in re.split(r"[,/]", split)]
    if len(parts) > 3:
        return "expected at most three shares TRAIN,VALID,TEST (e.g. 98,2,0)"
    try:
        shares = [float(s) for s in parts]
    except ValueError:
        return "expected numbers TRAIN,VALID,TEST (e.g. 98,2,0)"
    if any(not math.isfinite(x) or x < 0 for x in shares) or sum(shares) <= 0:
        return "shares must be non-negative numbers and not all zero (e.g. 98,2,0)"
    return None


def lint_hyperparameters(cfg: Config) -> list[str]:
    """Settings that run but are known to spike or slow training: warnings, not errors. The rules and
    their sources are megallm/training/hyperparams.py, which the spike report's advice reads too."""
    from megallm.training.hyperparams import violations

    return [f"{evidence}: {rule.why}; {rule.fix}" for rule, evidence in violations(cfg)]


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


if __name__ == "__main__":  # the README's `python -m megallm.config --describe`; megallm.describe is the CLI
    from megallm.describe import main

    sys.exit(main())
