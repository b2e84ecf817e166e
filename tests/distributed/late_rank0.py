"""Run a script (or `-m module`) under torchrun with rank 0 starting late, as on a busy node:
the other ranks reach any early exit first.

    torchrun --nproc-per-node 2 tests/distributed/late_rank0.py SECONDS launch/pretrain_llama2.py ARGS...
    torchrun --nproc-per-node 2 tests/distributed/late_rank0.py SECONDS -m megallm.preflight ARGS...
"""

import os
import runpy
import sys
import time

delay, target, *rest = sys.argv[1:]
if int(os.environ.get("RANK", 0)) == 0:
    time.sleep(float(delay))
if target == "-m":
    sys.argv = rest
    runpy.run_module(rest[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = [target, *rest]
    runpy.run_path(target, run_name="__main__")
