"""The data-parallel traffic megallm's engine generates is exactly the analytical figure.

One 2-rank launch of bench/comm_worker.py (dp 2, configs/tiny.yaml; 1,754,240 parameters, an
even count, so the flat buffers need no padding), one measured iteration each:
- all-reduce path: the fp32 grad buffer all-reduced, 8 P (dp-1)/dp bytes sent per rank;
- distributed optimizer, fp32: reduce-scatter 4 P (dp-1)/dp + all-gather 4 P (dp-1)/dp;
- distributed optimizer, bf16: reduce-scatter 4 P (dp-1)/dp + all-gather 2 P (dp-1)/dp: the
  (4 + 2) x P x (dp-1)/dp of Megatron's mixed precision.
Besides those, the data-parallel group carries one 16-byte all-reduce (the loss and NaN flag).
Also: the counting wrappers are gone once the `with` block ends.
"""

import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import comm_bytes  # noqa: E402

from megallm.parallel.comm_stats import CommStats  # noqa: E402

P = 1_754_240  # parameters of configs/tiny.yaml, all on each rank at tp 1 pp 1
SCENARIOS = [
    ("allreduce_fp32", "engine", {"tp": 1, "pp": 1}, ""),
    ("zero_fp32", "engine", {"tp": 1, "pp": 1, "use_distributed_optimizer": True}, ""),
    ("zero_bf16", "engine", {"tp": 1, "pp": 1, "use_distributed_optimizer": True, "bf16": True}, ""),
]


@pytest.fixture(scope="module")
def counts(tmp_path_factory):
    return comm_bytes.launch(tmp_path_factory.mktemp("comm"), SCENARIOS, nproc=2, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("name, expected", [
    ("allreduce_fp32", {"dp/all_reduce": 8 * P // 2 + 16}),
    ("zero_fp32", {"dp/reduce_scatter": 4 * P // 2, "dp/all_gather": 4 * P // 2, "dp/all_reduce": 16}),
    ("zero_bf16", {"dp/reduce_scatter": 4 * P // 2, "dp/all_gather": 2 * P // 2, "dp/all_reduce": 16}),
])
def test_data_parallel_bytes_equal_the_analytical_figure(counts, name, expected):
    for rank in counts[name]["ranks"]:
        assert rank["analytical"]["params"] == P
        dp = {k: v["sent_bytes"] for k, v in rank["counts"].items() if k.startswith("dp/")}
        assert dp == expected, (rank["rank"], dp)


def test_wrappers_are_removed_on_exit():
    originals = {name: getattr(dist, name) for name in CommStats.NAMES if hasattr(dist, name)}
    p2p = dist.P2POp
    with pytest.raises(RuntimeError):
        with CommStats():
            assert dist.all_reduce is not originals["all_reduce"] and dist.P2POp is not p2p
            raise RuntimeError("leave the block by an exception")
    assert {name: getattr(dist, name) for name in originals} == originals and dist.P2POp is p2p
