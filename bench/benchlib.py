"""What every benchmark shares: robust statistics, the machine's description, markdown tables.

Benchmarks report medians (one slow iteration from a page fault or a scheduler hiccup must not
move the figure) and, where a tail matters, the 90th percentile.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def median(xs: Iterable[float]) -> float:
    return float(np.median(np.asarray(list(xs), dtype=np.float64)))


def percentile(xs: Iterable[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    return float(np.percentile(np.asarray(list(xs), dtype=np.float64), q))


def spread(xs: Sequence[float]) -> float:
    """(max - min) / median: how far repeats of the same measurement disagree."""
    m = median(xs)
    return (max(xs) - min(xs)) / m if m else float("nan")


def table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A GitHub markdown table; floats are expected to be formatted by the caller."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return float("nan")


def git_commit(root: Path = ROOT) -> str:
    """Short commit hash, with '+dirty' when tracked files differ from it (the figures then belong
    to uncommitted code)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short=10", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return commit + ("+dirty" if dirty else "")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name, module in [("torch", "torch"), ("megatron-core", "megatron.core"), ("transformers", "transformers")]:
        try:
            out[name] = __import__(module, fromlist=["__version__"]).__version__
        except ImportError:
            out[name] = "not installed"
    return out


def machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "ram_gib": round(ram_gib(), 1),
            "os": f"{platform.system()} {platform.release()}", **versions()}
