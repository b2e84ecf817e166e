"""Storage facts of one node: dataset files, read speed, checkpoint space, mounts.

The dataset must be the same bytes on every node; hashing whole multi-TB files would take hours, so
each file is fingerprinted by its size and the sha256 of its first and last MiB (a truncated copy, a
different shuffle or a stale version all change one of the three).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from megallm.config import Config, parameter_count
from megallm.preflight.checks import SHARED_FILESYSTEMS

MiB = 1 << 20
# Bytes per parameter in one checkpoint: fp32 master weight 4 + Adam m 4 + Adam v 4 + the bf16
# model weight 2 = 14, rounded up to 16 for RNG/scheduler/data-loader state and file-system slack.
CHECKPOINT_BYTES_PER_PARAM = 16


def data_files(cfg: Config) -> list[str]:
    """The .bin/.idx pair of every prefix in data_path (Megatron's [W1, P1, W2, P2] weights skipped),
    and the tokenizer model: every file a rank opens at start."""
    files = []
    for item in cfg.data.data_path:
        try:
            float(item)
            continue  # a blend weight
        except ValueError:
            files += [f"{item}.bin", f"{item}.idx"]
    if cfg.data.tokenizer_model:
        files.append(cfg.data.tokenizer_model)
    return files


def fingerprint(path: str, chunk: int = MiB) -> dict:
    """{'size', 'head', 'tail'} (sha256 of the first and last `chunk` bytes) or {'error'}."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = hashlib.sha256(f.read(chunk)).hexdigest()
            f.seek(max(0, size - chunk))
            tail = hashlib.sha256(f.read(chunk)).hexdigest()
    except FileNotFoundError:
        return {"error": "missing"}
    except OSError as e:
        return {"error": f"not readable ({e.strerror or e})"}
    return {"size": size, "head": head, "tail": tail}


def read_throughput(paths: list[str], max_bytes: int, block: int = 4 * MiB) -> Optional[dict]:
    """Read up to max_bytes from the files, after asking the kernel to drop them from the page cache
    (otherwise a file just written or hashed reads at memory speed). {'bytes', 'seconds'}."""
    total, seconds = 0, 0.0
    for path in paths:
        if total >= max_bytes:
            break
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # reported by fingerprint()
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            start = time.perf_counter()
            while total < max_bytes:
                got = len(os.read(fd, min(block, max_bytes - total)))
                if not got:
                    break
                total += got
            seconds += time.perf_counter() - start
        finally:
            os.close(fd)
    return {"bytes": total, "seconds": seconds} if total else None


def parse_mounts(text: str) -> list[tuple[str, str]]:
    """(mount point, fs type) from /proc/mounts text; octal escapes (\\040 for space) decoded."""
    mounts = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            mounts.append((parts[1].encode().decode("unicode_escape"), parts[2]))
    return mounts


def mount_of(path: str, mounts: list[tuple[str, str]]) -> tuple[str, str]:
    """The mount holding path: the longest mount point that is a prefix of its real path."""
    real = os.path.realpath(path)
    best = ("/", "unknown")
    for point, fstype in mounts:
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, fstype)
    return best


def existing_ancestor(path: str) -> str:
    """The directory a new checkpoint dir would be created in: path itself or its nearest parent."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return str(p)


def checkpoint_need_bytes(cfg: Config, node_share: float) -> int:
    """Bytes one checkpoint needs where this node writes: the whole checkpoint on a shared
    filesystem (node_share 1), this node's share of the ranks on a node-local one."""
    return int(parameter_count(cfg.model) * CHECKPOINT_BYTES_PER_PARAM * node_share)


def storage_facts(cfg: Optional[Config], require_mounts: list[str], node_share: float, read_bytes: int,
                  mounts_text: Optional[str] = None) -> dict:
    """Everything checks.check_data_* / check_checkpoint / check_mounts need, for this node.
    node_share: this node's ranks / world size (its part of a checkpoint on a node-local disk)."""
    mounts = parse_mounts(mounts_text if mounts_text is not None else Path("/proc/mounts").read_text())
    facts: dict = {"files": {}, "read": None, "data_fs": {}, "checkpoint": None, "load": None,
                   "mounts_required": {p: os.path.ismount(p) for p in require_mounts}}
    if cfg is None:
        return facts
    files = data_files(cfg)
    facts["files"] = {p: fingerprint(p) for p in files}
    facts["data_fs"] = {p: list(mount_of(p, mounts)) for p in files if "error" not in facts["files"][p]}
    facts["read"] = read_throughput([p for p in files if p.endswith(".bin")], read_bytes)
    if cfg.checkpoint.save:
        probe = existing_ancestor(cfg.checkpoint.save)
        shared = mount_of(probe, mounts)[1] in SHARED_FILESYSTEMS
        ck = {"path": cfg.checkpoint.save, "need": checkpoint_need_bytes(cfg, 1.0 if shared else node_share)}
        if os.access(probe, os.W_OK):
            ck["free"] = shutil.disk_usage(probe).free
        else:
            ck["error"] = f"{probe} is not writable"
        facts["checkpoint"] = ck
    if cfg.checkpoint.load:
        facts["load"] = {"path": cfg.checkpoint.load, "exists": os.path.isdir(cfg.checkpoint.load)}
    return facts
