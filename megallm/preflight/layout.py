"""Which ranks the communication tests group and pair, in Megatron's rank order.

Training's groups come from megatron's parallel_state; preflight must not initialise it, so it takes
the same layout from megallm.parallel.topology.rank_groups. Links to test are the pipeline
neighbours (stage i -> i+1) plus a ring over the nodes (node k -> k+1, every local rank): the ring
gives every node two links even without pipeline parallelism, so a slow node is the common end of
its slow links. Both are O(nodes) pairs, never all pairs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import reduce
from typing import Optional

from megallm.parallel.topology import rank_groups


@dataclass
class Layout:
    tp: int
    pp: int
    tp_groups: list[list[int]]
    dp_groups: list[list[int]]
    links: list[tuple[int, int]]  # (src rank, dst rank) send/recv pairs to measure
    notes: list[str] = field(default_factory=list)
    tp_groups_span_nodes: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def node_of_rank(node_sizes: list[int]) -> dict[int, int]:
    """Global rank -> index of its node, ranks numbered node by node (as torchrun numbers them)."""
    return {r: node for node, size in enumerate(node_sizes) for r in range(sum(node_sizes[:node]),
                                                                            sum(node_sizes[:node]) + size)}


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, max(1, min(n, cap)) + 1) if n % d == 0)


def plan_layout(node_sizes: list[int], tp: Optional[int] = None, pp: Optional[int] = None) -> Layout:
    """node_sizes: processes on each present node, in node order. tp/pp from --config, or None."""
    world = sum(node_sizes)
    local = reduce(math.gcd, node_sizes)  # ranks per node every node has (all of them, normally)
    notes = []
    if tp is None:
        tp, pp = local, 1
        notes.append(f"no --config: one tensor-parallel group of {tp} ranks per node, data-parallel across nodes")
    elif world % (tp * pp) != 0:
        fallback = _largest_divisor_at_most(local, tp)
        notes.append(f"world size {world} does not fit tp x pp = {tp} x {pp}: testing tensor-parallel groups "
                     f"of {fallback} ranks within each node and no pipeline pairs")
        tp, pp = fallback, 1
    groups = rank_groups(world, tp, pp)
    node_of = node_of_rank(node_sizes)
    spanning = [g for g in groups.tensor if len({node_of[r] for r in g}) > 1]
    if spanning:
        notes.append(f"tensor-parallel groups span nodes (e.g. ranks {spanning[0]}): tp={tp} is larger than the "
                     f"{local} ranks per node, so tensor-parallel traffic would cross the network")
    links = [(g[i], g[i + 1]) for g in groups.pipeline for i in range(len(g) - 1)]
    starts = [sum(node_sizes[:k]) for k in range(len(node_sizes))]
    if len(node_sizes) > 1:
        links += [(starts[k] + j, starts[(k + 1) % len(node_sizes)] + j)
                  for k in range(len(node_sizes)) for j in range(local)]
    return Layout(tp, pp, groups.tensor, groups.data, list(dict.fromkeys(links)), notes, bool(spanning))


def link_rounds(links: list[tuple[int, int]], serial: bool) -> list[list[tuple[int, int]]]:
    """Split links into rounds in which each rank sends at most once and receives at most once, so a
    round's transfers run at the same time without one rank's two transfers sharing its bandwidth.
    serial: one link per round (CPU, where all ranks share the same cores)."""
    if serial:
        return [[link] for link in links]
    rounds: list[list[tuple[int, int]]] = []
    for src, dst in links:
        for rnd in rounds:
            if all(src != s and dst != d for s, d in rnd):
                rnd.append((src, dst))
                break
        else:
            rounds.append([(src, dst)])
    return rounds
