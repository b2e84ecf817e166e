"""At most one checkpoint write in flight per process, on a background thread.

The training loop hands over a snapshot (host copies of what this rank owns) and goes on; the
thread writes the files, hashes them, leaves the rank's done/ marker and, on rank 0, commits the
checkpoint once every rank's marker is there (megallm.checkpoint.save). The thread does file I/O
and hashing only, never a collective, so it cannot interleave with the training loop's
communication. A thread rather than a process: the snapshot is already in host memory, writing
and hashing release the GIL, and a process would have to copy the snapshot once more.

The next save, a rollback, and the end of training wait for the write in flight (`wait`); a write
that failed is reported there, and the previous checkpoint stays latest.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Optional

_thread: Optional[threading.Thread] = None
_error: Optional[str] = None
_label = ""


def submit(write: Callable[[], None], label: str) -> None:
    """Run write() in the background after the previous write has finished."""
    global _thread, _label
    wait()
    _label = label

    def body():
        global _error
        try:
            write()
        except BaseException as e:  # reported by wait(), in the main thread
            _error = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"

    _thread = threading.Thread(target=body, name=f"checkpoint-writer {label}", daemon=True)
    _thread.start()


def pending() -> bool:
    return _thread is not None and _thread.is_alive()


def wait() -> Optional[str]:
    """Block until the write in flight (if any) is done; returns its error, also printed."""
    global _thread, _error
    if _thread is None:
        return None
    start = time.perf_counter()
    _thread.join()
    waited = time.perf_counter() - start
    _thread, error, _error = None, _error, None
    if waited > 1.0:
        print(f" waited {waited:.1f} s for the background write of {_label}", flush=True)
    if error:
        print(f" warning: background checkpoint write of {_label} failed; the previous checkpoint stays "
              f"latest: {error}", file=sys.stderr, flush=True)
    return error
