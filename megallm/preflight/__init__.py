"""Pre-launch node health checks: `make preflight` / `python -m megallm.preflight` (docs/preflight.md).

run.py orchestrates; rendezvous.py registers nodes with a deadline; facts.py, storage.py and
measure.py measure; checks.py turns measurements into PASS/WARN/FAIL; report.py prints and writes.
"""
