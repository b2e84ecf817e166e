"""python -m megallm.preflight: see megallm/preflight/run.py and docs/preflight.md."""

import os
import sys

from megallm.preflight.run import main

code = main()
# Skip the interpreter's teardown: unloading torch takes seconds on a busy 2-core box, and every
# preflight process pays it before torchrun can return. Nothing is left to flush but stdio (report
# files are written, closed and renamed by then).
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
