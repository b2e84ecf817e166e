"""python -m megallm.preflight: see megallm/preflight/run.py and docs/preflight.md."""

import sys

from megallm.preflight.run import main

sys.exit(main())
