"""The resolved layout a plan is made for: the config's parallel sizes, sequence parallelism and
activation recompute as the engine will run them, plus precision and attention kernel."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from megallm.config import Config, validate
from megallm.planner.devices import Device

RECOMPUTE = ("none", "selective", "full")


class PlanError(ValueError):
    """A layout the planner cannot plan (it would not start); the message says which rule."""


@dataclass(frozen=True)
class Layout:
    world_size: int
    tp: int
    pp: int
    vpp: int  # 1: no interleaving
    dp: int
    micro_batch_size: int
    num_micro_batches: int  # per data-parallel rank and iteration
    seq_length: int
    schedule: str  # 1f1b | interleaved_1f1b | zero_bubble | gpipe
    recompute: str  # none | selective | full (the config's recompute_granularity; None is none)
    sequence_parallel: bool
    distributed_optimizer: bool  # ZeRO-1: optimizer state (and fp32 master weights) sharded over dp
    precision: str  # bf16: Megatron mixed precision; fp32: everything fp32 (megallm on CPU)
    flash_attention: bool  # attention scores never stored (SDPA's flash kernels, on GPU and CPU)
    fused_norm: bool  # RMSNorm saves input and 1/rms only (megallm.model.norm, apex, TE); torch's saves 3 tensors
    recompute_method: Optional[str] = None  # full: uniform | block
    recompute_num_layers: Optional[int] = None  # full: group size (uniform) or checkpointed layers per chunk (block)
    recompute_modules: tuple = ()  # selective: layernorm, swiglu, mlp
    overlap_grad_reduce: bool = False  # the dp gradient reduction runs beside the last backward

    @property
    def act_bytes(self) -> int:
        """Bytes per activation element: Megatron keeps bf16 activations; fp32 runs keep fp32."""
        return 2 if self.precision == "bf16" else 4

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_precision(cfg: Config, device: Device, precision: Optional[str] = None) -> str:
    """params_dtype 'auto' means bf16 on CUDA and fp32 on CPU, as megallm.platform decides."""
    requested = precision or ("bf16" if cfg.training.bf16 else cfg.training.params_dtype)
    if requested == "auto":
        return "bf16" if device.kind == "cuda" else "fp32"
    if requested in ("bf16", "fp16"):  # fp16 keeps the same bytes as bf16
        return "bf16"
    if requested == "fp32":
        return "fp32"
    raise PlanError(f"params_dtype={requested!r}: the planner knows bf16 (mixed precision) and fp32")


def make_layout(cfg: Config, world_size: int, device: Device, recompute: Optional[str] = None,
                sequence_parallel: Optional[bool] = None, precision: Optional[str] = None,
                flash_attention: bool = True) -> Layout:
    """Check the config for this world size and fix every choice the memory model depends on.

    recompute / sequence_parallel None: the config's (recompute_granularity, recompute_method,
    recompute_num_layers, recompute_modules; sequence_parallel), i.e. what the engine will run.
    A recompute given here that differs from the config's uses the engine's defaults for it:
    full = uniform groups of 1 layer (Megatron's usual), selective = the config's modules.
    Sequence parallelism is off at tp 1, as in the engine.
    """
    errors = validate(cfg, world_size)
    if errors:
        raise PlanError("; ".join(errors))
    p, t = cfg.parallel, cfg.training
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    if sequence_parallel is None:
        sequence_parallel = p.sequence_parallel
    configured = t.recompute_granularity or "none"
    if recompute is None or recompute == configured:
        recompute, method, num_layers = configured, t.recompute_method, t.recompute_num_layers
    else:
        method, num_layers = ("uniform", 1) if recompute == "full" else (None, None)
    modules = tuple(t.recompute_modules) if recompute == "selective" else ()
    if recompute not in RECOMPUTE:
        raise PlanError(f"recompute={recompute!r}: must be one of {', '.join(RECOMPUTE)}")
    return Layout(
        world_size=world_size, tp=tp, pp=pp, vpp=p.virtual_pipeline_model_parallel_size or 1,
        dp=cfg.data_parallel_size(world_size), micro_batch_size=t.micro_batch_size,
        num_micro_batches=cfg.num_micro_batches(world_size), seq_length=t.seq_length,
        schedule=p.resolved_pipeline_schedule, recompute=recompute,
        sequence_parallel=bool(sequence_parallel) and tp > 1,
        distributed_optimizer=p.use_distributed_optimizer, precision=resolve_precision(cfg, device, precision),
        flash_attention=flash_attention, fused_norm=True,  # megallm.model.norm on CPU, apex/TE on CUDA
        recompute_method=method, recompute_num_layers=num_layers, recompute_modules=modules,
        overlap_grad_reduce=p.overlap_grad_reduce,
    )
