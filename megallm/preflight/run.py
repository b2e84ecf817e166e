"""The preflight runner: register -> reach -> measure -> judge -> report, on every process.

    torchrun --standalone --nproc-per-node 8 -m megallm.preflight \\
        --nnodes 8 --node-rank $K --master-addr node0 --master-port 29511 --config configs/llama2_70b.yaml

One process per device on every node. Node 0's local rank 0 ("the host") serves the registration
store, decides who is present, and prints the verdict; everyone exits 1 when anything FAILed.
Under a multi-node torchrun the same module works (nodes and ranks come from torchrun's env), but
torchrun's own rendezvous then waits for a missing node itself: launch each node with --standalone
and pass --nnodes/--node-rank/--master-addr to the module, so a missing node is named in --timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from megallm import config as config_mod
from megallm.inputs import refuse
from megallm.preflight import checks, facts, measure, rendezvous, report, storage
from megallm.preflight import layout as layout_mod
from megallm.preflight.profiles import PROFILES, guess_profile

GiB = 1 << 30


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megallm.preflight", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="run config: tp/pp layout, data files, checkpoint dir, memory need")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for all nodes (and per collective)")
    p.add_argument("--json-out", help="write every measurement and result here (JSON)")
    p.add_argument("--hosts-out", help="write the hostnames of the nodes without FAIL here, one per line")
    p.add_argument("--profile", choices=sorted(PROFILES), help="absolute floors (default: guessed from the device)")
    p.add_argument("--min-free-memory-gb", type=float, help="free memory each device needs (default: the planner's "
                   "need for --config)")
    p.add_argument("--require-mount", action="append", default=[], metavar="PATH",
                   help="a mount point every node must have (repeatable)")
    p.add_argument("--nnodes", type=int, help="nodes expected (default: from torchrun's env, else 1)")
    p.add_argument("--node-rank", type=int, help="this node's rank (default: torchrun's GROUP_RANK, else 0)")
    p.add_argument("--master-addr", help="node 0's address (default: $MASTER_ADDR, else 127.0.0.1)")
    p.add_argument("--master-port", type=int, help="port of the preflight store on node 0 "
                   "(default: $MASTER_PORT + 1, beside torchrun's own store)")
    p.add_argument("--expected-hosts", help="hostnames by node rank, comma-separated or @FILE, to name missing nodes")
    p.add_argument("--read-mib", type=int, default=None, help="dataset MiB to read for the throughput test "
                   "(default: 1024 on GPU, 64 on CPU)")
    return p


@dataclass
class Where:
    node: int
    nnodes: int
    local_rank: int
    local_world: int
    master_addr: str
    port: int
    cores: int  # the node's cores as launched, before a rank pins itself to its share

    @property
    def host(self) -> bool:
        return self.node == 0 and self.local_rank == 0


def where_am_i(args: argparse.Namespace, env=os.environ) -> Where:
    """This process's place, from the flags first, torchrun's environment second."""
    local_world = int(env.get("LOCAL_WORLD_SIZE", 1))
    nnodes = args.nnodes or max(1, int(env.get("WORLD_SIZE", local_world)) // local_world)
    node = args.node_rank if args.node_rank is not None else int(env.get("GROUP_RANK", 0))
    port = args.master_port or int(env.get("MASTER_PORT", 29510)) + 1
    return Where(node, nnodes, int(env.get("LOCAL_RANK", 0)), local_world,
                 args.master_addr or env.get("MASTER_ADDR", "127.0.0.1"), port, facts.cpu_cores())


def expected_hosts(spec: Optional[str]) -> Optional[list[str]]:
    if not spec:
        return None
    text = open(spec[1:]).read() if spec.startswith("@") else spec
    return [h.strip() for h in text.replace(",", "\n").splitlines() if h.strip()]


def memory_need(cfg, world: int, args) -> tuple[Optional[int], str]:
    """Bytes each device needs: the flag, else the planner's peak for the config's layout."""
    if args.min_free_memory_gb is not None:
        return int(args.min_free_memory_gb * GiB), "--min-free-memory-gb"
    if cfg is None:
        return None, "no --config"
    from megallm.planner import memory_need_bytes

    p = cfg.parallel
    full = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    # A single-node preflight of a 64-GPU layout: plan for the layout's smallest world (dp = 1).
    plan_world = world if world % full == 0 else full
    try:
        return int(memory_need_bytes(cfg, plan_world)), f"planner, world size {plan_world}"
    except Exception as e:  # the planner refusing a config is its own error to report
        return None, f"planner failed: {e}"


def pin_to_share(local_rank: int, local_world: int) -> None:
    """On CPU, run each rank on its own share of the node's cores, as a pinned CPU training rank
    runs: measured on a floating share, two ranks of a group land on one core now and then and
    halve their bandwidth, which reads as a straggler. (Threads made later, gloo's, inherit it.)"""
    cores = sorted(os.sched_getaffinity(0))
    share = len(cores) // local_world
    if share >= 1:
        os.sched_setaffinity(0, cores[local_rank * share:(local_rank + 1) * share])
    torch.set_num_threads(max(1, share))


@contextlib.contextmanager
def on_cpus(cpus: Optional[set[int]]):
    """Run this thread on cpus (None: leave it) for the block, then return to its own share."""
    if cpus is None:
        yield
        return
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, mine)


def in_turns(batches: list[list], mine: Callable[[object], bool], fn: Callable[[object], object]) -> list:
    """Run fn on the items of each batch this rank takes part in; a barrier closes every batch.
    One item per batch measures ranks/groups/links one at a time (CPU), a full batch concurrently."""
    out = []
    for batch in batches:
        out += [fn(item) for item in batch if mine(item)]
        dist.barrier()
    return out


def _safe(fn: Callable[[], float]) -> object:
    """A local measurement that fails (out of memory, a driver error) is reported, not fatal."""
    try:
        return fn()
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _best(values: list) -> object:
    numbers = [v for v in values if isinstance(v, (int, float))]
    return max(numbers) if numbers else values[0]


def measure_rank(lay: layout_mod.Layout, rank: int, world: int, device: torch.device, profile,
                 launch_cpus: Optional[set[int]] = None) -> dict:
    """This rank's part of the compute and communication measurements (all ranks call this).

    Serial (CPU): one rank, group or link at a time, the whole sequence several times over (the
    profile's rounds), keeping each one's best: a burst of outside load then costs one turn, not one
    rank its verdict. The GEMM, alone on the node in its turn, may use any core the node was
    launched with (launch_cpus): pinned, a burst of outside work on one core would read as a slow
    local rank on every node."""
    serial, nbytes, timing = profile.serial, profile.message_bytes, profile.timing
    mine: dict = {"rank": {}, "groups": [], "links": []}
    if device.type == "cuda":
        mine["rank"]["free_bytes"] = _safe(lambda: torch.cuda.mem_get_info(device)[0])
        mine["rank"]["h2d_gbps"] = _safe(lambda: measure.h2d_gbps(device, nbytes, timing))
    gemm = _safe(lambda: measure.Gemm(device, getattr(torch, profile.gemm_dtype), profile.gemm_size))

    def gemm_turn(_) -> list:
        with on_cpus(launch_cpus if serial else None):
            return _safe(lambda: gemm.seconds(profile.gemm_turn_reps)) if isinstance(gemm, measure.Gemm) else gemm

    turns = [[r] for r in range(world)] if serial else [list(range(world))]
    samples = in_turns(turns * profile.gemm_rounds, lambda r: r == rank, gemm_turn)
    seconds = [t for turn in samples if isinstance(turn, list) for t in turn]
    mine["rank"]["gemm_tflops"] = gemm.flops / measure.pick(seconds, timing) / 1e12 if seconds else samples[0]
    groups = {"tp": [g for g in lay.tp_groups if len(g) > 1], "dp": [g for g in lay.dp_groups if len(g) > 1],
              "world": [list(range(world))] if world > 1 else []}
    handles = {kind: {tuple(g): dist.new_group(g) if kind != "world" else None for g in gs}
               for kind, gs in groups.items()}
    for kind, gs in groups.items():
        turns = [[g] for g in gs] if serial else [gs]
        busbw = in_turns(turns * profile.comm_rounds, lambda g: rank in g, lambda g: measure.allreduce_busbw(
            handles[kind][tuple(g)], len(g), nbytes, device, timing))
        mine["groups"] += [{"kind": kind, "ranks": g, "gbps": _best(busbw)} for g in gs if rank in g]
    turns = [[rnd] for rnd in layout_mod.link_rounds(lay.links, serial)]
    links: dict[tuple[int, int], list] = {}
    for got in in_turns(turns * profile.comm_rounds, lambda rnd: any(rank in link for link in rnd),
                        lambda rnd: measure.p2p_gbps(rnd, rank, nbytes, device, timing)):
        for link, gbps in got.items():
            links.setdefault(link, []).append(gbps)
    mine["links"] = [{"src": s, "dst": d, "gbps": _best(v)} for (s, d), v in links.items()]
    return mine


def merge_rank_reports(reports: dict[int, dict], world: int, lay: layout_mod.Layout) -> tuple[dict, dict, list]:
    """Per-rank posts -> (ranks, groups by kind, links). A group's bandwidth is its slowest
    member's (the collective is as fast as its last rank); a silent rank reads 'no report'."""
    silent = {k: "no report" for k in ("gemm_tflops", "h2d_gbps", "free_bytes")}
    ranks = {r: reports[r]["rank"] if r in reports else dict(silent) for r in range(world)}
    groups: dict[str, dict[tuple, object]] = {}
    for post in reports.values():
        for g in post["groups"]:
            seen = groups.setdefault(g["kind"], {}).get(tuple(g["ranks"]))
            groups[g["kind"]][tuple(g["ranks"])] = g["gbps"] if seen is None else min(seen, g["gbps"])
    links = {(lk["src"], lk["dst"]): lk["gbps"] for post in reports.values() for lk in post["links"]}
    return (ranks, {kind: [{"ranks": list(k), "gbps": v} for k, v in gs.items()] for kind, gs in groups.items()},
            [{"src": s, "dst": d, "gbps": links.get((s, d), "no report")} for s, d in lay.links])


def _say(where: Where, message: str) -> None:
    if where.local_rank == 0:
        print(f"preflight node {where.node}: {message}", flush=True)


def register(store, where: Where, timeout: float, started: float, listener) -> dict:
    """Post this node's facts (local rank 0); node 0 publishes the roster at the deadline; every
    process returns it. Raises TimeoutError when no roster comes (node 0 gone)."""
    if listener:
        node_facts = facts.host_facts(where.cores) | {
            "nproc": where.local_world, "versions": facts.versions(), "gpu_health": facts.gpu_health(),
            "addr": rendezvous.own_address(where.master_addr, where.port), "port": listener.port}
        rendezvous.post(store, f"node/{where.node}", node_facts)
    if where.host:
        roster = rendezvous.collect_roster(store, where.nnodes, started + timeout, started)
        missing = sorted(set(range(where.nnodes)) - set(roster["present"]))
        print(f"preflight: {len(roster['present'])}/{where.nnodes} node(s) joined"
              + (f"; missing node(s) {missing}" if missing else ""), flush=True)
    return rendezvous.wait_for(store, "roster", timeout + 30)


def reachability(store, where: Where, roster: dict, lay: layout_mod.Layout, node_of: dict, listener,
                 timeout: float) -> dict:
    """Each node connects to node 0 and its link partners; node 0 decides whether the process group
    can be built ('skipped' says why not). Returns {'reach', 'skipped'} on every process."""
    if listener:
        partners = {node_of[r] for link in lay.links for r in link
                    if where.node in (node_of[link[0]], node_of[link[1]])}
        peers = {k: (roster["nodes"][str(k)]["addr"], roster["nodes"][str(k)]["port"])
                 for k in (partners | {roster["present"][0]}) - {where.node}}
        rendezvous.post(store, f"reach/{where.node}", rendezvous.probe_peers(peers, min(10.0, timeout)))
    if where.host:
        found = rendezvous.wait_for_all(store, [f"reach/{k}" for k in roster["present"]], time.monotonic() + 20)
        reach = {k: found[f"reach/{k}"][0] if f"reach/{k}" in found else {"0": "no report"} for k in roster["present"]}
        unreachable = [f"node {k} cannot reach node {p}" for k, ps in reach.items() for p, v in ps.items()
                       if not isinstance(v, (int, float))]
        rendezvous.post(store, "go", {"reach": {str(k): v for k, v in reach.items()},
                                      "skipped": "; ".join(unreachable) or None})
    return rendezvous.wait_for(store, "go", timeout + 30)


def measure_and_post(store, lay: layout_mod.Layout, rank: int, world: int, device: torch.device, profile,
                     timeout: float, launch_cpus: Optional[set[int]]) -> None:
    """Build the process group from the registration store, measure, post. A failure (a collective
    timing out because a peer died) is posted too, so node 0 still reports."""
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.PrefixStore("pg", store),
                                rank=rank, world_size=world, timeout=timedelta(seconds=timeout),
                                **({"device_id": device} if device.type == "cuda" else {}))
        mine = measure_rank(lay, rank, world, device, profile, launch_cpus)
    except Exception as e:
        why = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        mine = {"rank": {k: why for k in ("gemm_tflops", "h2d_gbps", "free_bytes")}, "groups": [], "links": []}
    rendezvous.post(store, f"meas/{rank}", mine)


def judge_and_report(store, args, where: Where, m: dict, profile, lay: layout_mod.Layout, started: float) -> bool:
    """Node 0: gather what the nodes and ranks posted into m, judge, print, write the files."""
    world, present = len(m["node_of_rank"]), sorted(m["nodes"])
    deadline = time.monotonic() + args.timeout
    stores = rendezvous.wait_for_all(store, [f"storage/{k}" for k in present], deadline)
    m["storage"] = {k: stores[f"storage/{k}"][0] if f"storage/{k}" in stores else {"error": "no report"}
                    for k in present}
    posts = {} if m["skipped"] else rendezvous.wait_for_all(store, [f"meas/{r}" for r in range(world)], deadline)
    m["ranks"], m["groups"], m["links"] = merge_rank_reports(
        {int(k.split("/")[1]): v for k, (v, _) in posts.items()}, world, lay)
    results = checks.evaluate(m, profile)
    m["seconds"] = round(time.monotonic() - started, 2)
    hosts = m["expected_hosts"]
    names = {k: m["nodes"][k]["hostname"] if k in m["nodes"] else (hosts[k] if hosts and k < len(hosts) else "?")
             for k in range(where.nnodes)}
    notes = lay.notes + [n for n in (m["profile_note"], f"profile {profile.name}; memory need: {m['need_source']}",
                                     f"finished in {m['seconds']} s") if n]
    report.print_report(results, names, notes)
    if args.json_out:
        report.write_json(args.json_out, m, results)
    if args.hosts_out:
        report.write_hosts(args.hosts_out, results, names)
    return checks.passed(results)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    where = where_am_i(args)
    started = time.monotonic()
    try:
        # Only the layout, data files and checkpoint directory are read: a config may leave the model
        # at its defaults (which a 64-rank layout would not validate against).
        cfg = config_mod.load_yaml(args.config) if args.config else None
        problems = []
        hosts = expected_hosts(args.expected_hosts)
        facts.parse_fake_versions(os.environ.get(facts.FAKE_VERSION_ENV, ""))
    except (config_mod.ConfigError, ValueError) as e:
        problems = [str(e)]
    except OSError as e:  # --expected-hosts @FILE
        problems = [f"{e.filename}: {e.strerror}" if e.filename else str(e)]
    if problems:  # every rank returns 2; refuse() makes sure the reason is printed before any exits
        return refuse([f"preflight: {p}" for p in problems])
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", where.local_rank) if cuda else torch.device("cpu")
    launch_cpus = None if cuda else os.sched_getaffinity(0)
    if cuda:
        torch.cuda.set_device(device)
    else:
        pin_to_share(where.local_rank, where.local_world)
    name, profile_note = guess_profile(torch.cuda.get_device_name(device) if cuda else None)
    profile = PROFILES[args.profile or name]

    # 1. Registration: who came within the timeout.
    if where.host:
        print(f"preflight: waiting up to {args.timeout:.0f} s for {where.nnodes} node(s) at "
              f"{where.master_addr}:{where.port}", flush=True)
    listener = None
    try:
        store = rendezvous.connect(where.master_addr, where.port, where.host, args.timeout)
        listener = rendezvous.Listener() if where.local_rank == 0 else None
        roster = register(store, where, args.timeout, started, listener)
    except (rendezvous.MasterUnreachable, TimeoutError) as e:
        _say(where, f"FAIL rendezvous: {e}")
        return 1
    if where.node not in roster["present"]:
        _say(where, f"FAIL rendezvous: joined after node 0's {args.timeout:.0f} s deadline; reported missing")
        return 1
    sizes, offsets = rendezvous.roster_ranks(roster)
    rank, world = offsets[where.node] + where.local_rank, sum(sizes)
    node_of = {r: roster["present"][i] for r, i in layout_mod.node_of_rank(sizes).items()}
    tp_pp = ((cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size) if cfg
             else (None, None))
    lay = layout_mod.plan_layout(sizes, *tp_pp)

    # 2. Reachability, before any full-mesh connect. 3. Storage per node, then the measurements.
    go = reachability(store, where, roster, lay, node_of, listener, args.timeout)
    if listener:
        read_mib = args.read_mib or (1024 if cuda else 64)
        rendezvous.post(store, f"storage/{where.node}", storage.storage_facts(
            cfg, args.require_mount, where.local_world / world, read_mib << 20))
    if not go["skipped"]:
        measure_and_post(store, lay, rank, world, device, profile, args.timeout, launch_cpus)

    # 4. Node 0 judges and reports; everyone exits with the verdict.
    if where.host:
        need, need_source = memory_need(cfg, world, args)
        m = {"nnodes": where.nnodes, "timeout_s": args.timeout, "expected_hosts": hosts,
             "profile": profile.to_dict(), "profile_note": profile_note, "need_bytes": need, "need_source": need_source,
             "nodes": {int(k): v for k, v in roster["nodes"].items()},
             "reach": {int(k): {int(p): v for p, v in peers.items()} for k, peers in go["reach"].items()},
             "layout": lay.to_dict(), "node_of_rank": node_of, "skipped": go["skipped"]}
        rendezvous.post(store, "verdict", {"passed": judge_and_report(store, args, where, m, profile, lay, started)})
    try:
        verdict = rendezvous.wait_for(store, "verdict", 2 * args.timeout + 60)
    except TimeoutError as e:
        _say(where, f"FAIL: {e}")
        return 1
    if where.host:
        rendezvous.wait_done(store, world - 1, 10)
    else:
        store.add("done", 1)
        _say(where, f"{'PASS' if verdict['passed'] else 'FAIL'} (the report is on node 0)")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if verdict["passed"] else 1
