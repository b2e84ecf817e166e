"""The part every distributed worker shares: one torchrun launch runs several scenarios (start-up
dominates on 2 CPU cores), each a config built from the spec with megatron's groups set up for it."""

import json
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

from megallm.config import Config, apply_overrides, load_yaml, validate
from megallm.parallel.topology import initialize_model_parallel


def load_spec(path: str) -> dict:
    """SPEC.json: {"config": YAML, "out": DIR, "scenarios": [{"name": ..., "overrides": {...}}, ...], ...};
    joins the gloo process group that torchrun set up."""
    dist.init_process_group("gloo")
    return json.loads(Path(path).read_text())


def each_scenario(spec: dict, defaults: dict | None = None) -> Iterator[tuple[dict, Config]]:
    """(scenario, config) in order, the model-parallel groups initialised for each layout.
    Overrides apply over `defaults`, which apply over the spec's YAML."""
    for sc in spec["scenarios"]:
        cfg = apply_overrides(load_yaml(spec["config"]),
                              {"tensorboard": False, **(defaults or {}), **sc.get("overrides", {})})
        set_up_layout(cfg)
        yield sc, cfg


def set_up_layout(cfg: Config) -> None:
    """Check cfg against the world size and make megatron's groups for its layout."""
    errors = validate(cfg, dist.get_world_size())
    assert not errors, errors
    p = cfg.parallel
    initialize_model_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                              p.virtual_pipeline_model_parallel_size)
