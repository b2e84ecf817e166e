"""Moved: checkpoints live in the megallm.checkpoint package (format, sharded save, async writer,
layout-free load); rollback and signal handling in megallm.training.resilience. These names stay
importable from here for code written against the old module."""

from megallm.checkpoint import (FORMAT, LATEST, CheckpointError, is_model_only, load,  # noqa: F401
                                load_model_weights, read_meta, save)
