import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # configs/ and tools/ are addressed from the repo root


@pytest.fixture(scope="session")
def single_rank():
    """A world of one (gloo) with megatron's groups at tp = pp = 1, for in-process model tests."""
    import torch.distributed as dist

    from megallm.parallel.topology import initialize_model_parallel
    from tests.launch import free_port

    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    initialize_model_parallel(1, 1)
    yield
