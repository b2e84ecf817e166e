import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # configs/ and tools/ are addressed from the repo root
# Tools and launchers run as subprocesses import megallm from this tree, whichever checkout the venv installed.
_inherited = filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *_inherited])


@pytest.fixture(scope="session")
def single_rank():
    """A world of one (gloo) with megatron's groups at tp = pp = 1, for in-process model tests."""
    from megallm.parallel.topology import init_world_of_one, initialize_model_parallel

    init_world_of_one()
    initialize_model_parallel(1, 1)
    yield
