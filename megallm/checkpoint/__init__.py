"""Checkpoints: the on-disk format (format.py), parallel sharded save with an optional background
writer (save.py, async_writer.py), layout-free load (load.py, regions.py), the v1 reader (v1.py),
and HuggingFace conversion (convert.py, hf_files.py, hf_config.py). See docs/checkpoints.md.

The training loop calls save/load with its Trainer; this package reads the trainer's modules and
optimizer and exchanges its progress only through Trainer.state_dict()/load_state_dict().
"""

from megallm.checkpoint.format import (  # noqa: F401
    FORMAT,
    LATEST,
    CheckpointError,
    complete_iterations,
    file_record,
    is_model_only,
    iter_dir,
    load_candidates,
    verify_files,
)
from megallm.checkpoint.load import load, load_model_weights, read_meta  # noqa: F401
from megallm.checkpoint.save import due, save, wait_for_pending  # noqa: F401
