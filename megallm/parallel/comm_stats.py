"""Bytes each rank sends, per collective and per process group, while a block of code runs.

    with CommStats() as stats:
        trainer.train_step()
    stats.table()   # {("dp", "reduce_scatter"): {"calls": 1, "payload_bytes": ..., "sent_bytes": ...}, ...}

The torch.distributed functions megallm, megatron-core's tensor-parallel layers and torch
pipelining call are replaced by counting wrappers for the duration of the `with` block only, and
restored on exit (also on an exception): nothing stays patched outside it.

sent_bytes is what one rank puts on the wire under the bandwidth-optimal (ring) algorithms, the
figure the analytical minimum is stated in: with n ranks in the group and N the collective's
full size in bytes,

    all_reduce       2 N (n-1)/n        reduce_scatter   N (n-1)/n  (N = the input)
    all_gather       N (n-1)/n  (N = the output)          broadcast  N on the source, 0 elsewhere
    send             N                  (pipeline p2p: each P2POp(isend) made, and dist.send)

payload_bytes is N itself. Receives are not counted: they are someone else's sends.
"""

from __future__ import annotations

import functools
from collections import defaultdict

import torch
import torch.distributed as dist


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def group_name(group) -> str:
    """dp, tp, pp or mp (tp x pp) for megatron's groups, world for the default group."""
    from megatron.core import parallel_state as ps

    if group is None or group is dist.group.WORLD:
        return "world"
    named = {"dp": ps.get_data_parallel_group, "tp": ps.get_tensor_model_parallel_group,
             "pp": ps.get_pipeline_model_parallel_group, "mp": ps.get_model_parallel_group}
    for name, get in named.items():
        try:
            if group is get():
                return name
        except (AssertionError, RuntimeError):
            continue
    return "other"


class CommStats:
    """Counting wrappers around torch.distributed's collectives, active inside `with` only."""

    def __init__(self):
        self.records: dict[tuple[str, str], dict[str, int]] = defaultdict(
            lambda: {"calls": 0, "payload_bytes": 0, "sent_bytes": 0})
        self._saved: dict[str, object] = {}

    def _add(self, group, op: str, payload: int, sent: float) -> None:
        r = self.records[(group_name(group), op)]
        r["calls"] += 1
        r["payload_bytes"] += payload
        r["sent_bytes"] += int(round(sent))

    @staticmethod
    def _size(group) -> int:
        return dist.get_world_size(group)

    def _count(self, name: str, args: tuple, kwargs: dict) -> None:
        def arg(i, key, default=None):
            return args[i] if len(args) > i else kwargs.get(key, default)

        if name == "all_reduce":
            t, group = arg(0, "tensor"), arg(2, "group")
            n = self._size(group)
            self._add(group, "all_reduce", _nbytes(t), 2 * _nbytes(t) * (n - 1) / n)
        elif name in ("reduce_scatter_single", "reduce_scatter_tensor"):
            inp, group = arg(1, "input"), arg(3, "group")
            n = self._size(group)
            self._add(group, "reduce_scatter", _nbytes(inp), _nbytes(inp) * (n - 1) / n)
        elif name in ("all_gather_single", "all_gather_into_tensor"):
            out, group = arg(0, "output_tensor"), arg(2, "group")
            n = self._size(group)
            self._add(group, "all_gather", _nbytes(out), _nbytes(out) * (n - 1) / n)
        elif name == "all_gather":
            t, group = arg(1, "tensor"), arg(2, "group")
            n = self._size(group)
            self._add(group, "all_gather", n * _nbytes(t), (n - 1) * _nbytes(t))
        elif name == "broadcast":
            t, src, group = arg(0, "tensor"), arg(1, "src"), arg(2, "group")
            self._add(group, "broadcast", _nbytes(t), _nbytes(t) if dist.get_rank() == src else 0)
        elif name == "send":
            t, group = arg(0, "tensor"), arg(2, "group")
            self._add(group, "send", _nbytes(t), _nbytes(t))

    NAMES = ("all_reduce", "reduce_scatter_single", "reduce_scatter_tensor", "all_gather_single",
             "all_gather_into_tensor", "all_gather", "broadcast", "send")

    def __enter__(self) -> CommStats:
        for name in self.NAMES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._saved[name] = original

            @functools.wraps(original)
            def wrapper(*args, _name=name, _original=original, **kwargs):
                self._count(_name, args, kwargs)
                return _original(*args, **kwargs)

            setattr(dist, name, wrapper)
        # Pipeline sends are P2POp(isend, ...) run by batch_isend_irecv or called directly; P2POp
        # only accepts torch's own isend, so each send op is counted where it is made (once each).
        self._saved["P2POp"] = dist.P2POp
        stats = self

        class CountingP2POp(dist.P2POp):
            def __init__(self, op, tensor, peer=None, group=None, *args, **kwargs):
                super().__init__(op, tensor, peer, group, *args, **kwargs)
                if op is dist.isend:
                    stats._add(group, "send", _nbytes(tensor), _nbytes(tensor))

        dist.P2POp = CountingP2POp
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)
        self._saved.clear()

    def table(self) -> dict[str, dict[str, int]]:
        """{"group/op": {...}}, JSON-friendly."""
        return {f"{g}/{op}": dict(v) for (g, op), v in sorted(self.records.items())}
