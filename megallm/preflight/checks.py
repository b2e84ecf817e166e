"""PASS / WARN / FAIL from measurements: pure functions, no torch, no I/O.

Every check returns Results keyed by node rank (None: the whole world, e.g. the world all-reduce).
Two rules decide:
  floor    a value below the profile's absolute floor is FAIL;
  outlier  the production straggler rule |x - median| > max(MAD, 10% of median), over >= 3 samples.
           A slow outlier is FAIL: one straggler sets the pace of every synchronous step. A fast GEMM
           is WARN: harmless for speed, but a sign the node is not like its peers (other SKU, clocks);
           a fast link is PASS (a shorter network path: nothing to fix). Storage read speed has a
           floor only (see check_read_throughput).
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Hashable, Iterable
from dataclasses import asdict, dataclass
from typing import Optional

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"
_SEVERITY = {SKIP: 0, PASS: 1, WARN: 2, FAIL: 3}
GiB = 1 << 30
MiB = 1 << 20
# A read shorter than this is mostly latency and page cache: reported, not judged.
MIN_READ_BYTES = 16 * MiB
SHARED_FILESYSTEMS = {"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph", "glusterfs",
                      "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs", "9p", "wekafs"}


@dataclass
class Result:
    check: str
    node: Optional[int]  # None: the whole world
    status: str
    value: Optional[float] = None
    unit: str = ""
    threshold: str = ""
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def worst(statuses: Iterable[str]) -> str:
    return max(statuses, key=_SEVERITY.__getitem__, default=SKIP)


def fmt(x: Optional[float]) -> str:
    """3 significant digits, the precision these measurements deserve."""
    if x is None:
        return "-"
    return f"{x:.3g}" if abs(x) < 1e5 else f"{x:,.0f}"


def outliers(values: dict, rel: float = 0.1) -> dict:
    """key -> 'slow' | 'fast' for values breaking |x - median| > max(MAD, rel x median); rel is 10%
    in production, larger only where the measurement itself is noisier (see profiles.py)."""
    if len(values) < 3:
        return {}
    med = statistics.median(values.values())
    mad = statistics.median(abs(v - med) for v in values.values())
    limit = max(mad, rel * abs(med))
    return {k: ("slow" if v < med else "fast") for k, v in values.items() if abs(v - med) > limit}


def reference_value(values: dict[int, Hashable]) -> Hashable:
    """What most nodes have; on a tie, what the lowest node rank has (node 0 launched the job)."""
    counts = Counter(values.values())
    top = max(counts.values())
    return next(v for _, v in sorted(values.items()) if counts[v] == top)


def _number(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def judge(value, floor: Optional[float], outlier: Optional[str], median: Optional[float], name: str,
          unit: str, fast_status: str = WARN) -> tuple[str, str]:
    """One sample: (status, why). value is a number or an error string from the measurement."""
    if _number(value) is None:
        return FAIL, f"{name}: not measured ({value})"
    if floor is not None and value < floor:
        return FAIL, f"{name}: {fmt(value)} {unit} < floor {fmt(floor)}"
    if outlier == "slow":
        return FAIL, (f"{name}: {fmt(value)} {unit}, {100 * (1 - value / median):.0f}% below median "
                      f"{fmt(median)} (straggler)")
    if outlier == "fast":
        return fast_status, f"{name}: {fmt(value)} {unit}, {100 * (value / median - 1):.0f}% above median {fmt(median)}"
    return PASS, ""


def _median(values: dict) -> Optional[float]:
    return statistics.median(values.values()) if values else None


def _threshold(floor: Optional[float], unit: str, median: Optional[float], n: int, rel: float = 0.1) -> str:
    parts = [f">= {fmt(floor)} {unit}"] if floor is not None else []
    if n >= 3:
        parts.append(f"within max(MAD,{rel:.0%}) of median {fmt(median)}")
    return "; ".join(parts)


def _per_node(check: str, samples: dict, node_of, floor: Optional[float], unit: str,
              label, fast_status: str = WARN, rel: float = 0.1) -> list[Result]:
    """Judge each sample, then one Result per node: its worst sample, its lowest value."""
    numbers = {k: v for k, v in samples.items() if _number(v) is not None}
    flagged, med = outliers(numbers, rel), _median(numbers)
    threshold = _threshold(floor, unit, med, len(numbers), rel)
    by_node: dict = {}
    for key, value in samples.items():
        status, why = judge(value, floor, flagged.get(key), med, label(key), unit, fast_status)
        by_node.setdefault(node_of(key), []).append((status, why, _number(value)))
    results = []
    for node, judged in sorted(by_node.items(), key=lambda kv: (kv[0] is not None, kv[0] or 0)):
        values = [v for _, _, v in judged if v is not None]
        results.append(Result(check, node, worst(s for s, _, _ in judged), min(values) if values else None,
                              unit, threshold, "; ".join(w for _, w, _ in judged if w)))
    return results


# ----------------------------------------------------------------------------------------------
# 1. Rendezvous and connectivity


def check_rendezvous(nnodes: int, joined: dict[int, dict], timeout_s: float,
                     expected_hosts: Optional[list[str]] = None) -> list[Result]:
    """joined: node rank -> {'hostname', 'joined_s'} for every node that registered in time."""
    results = []
    for node in range(nnodes):
        if node in joined:
            j = joined[node]
            results.append(Result("rendezvous", node, PASS, j.get("joined_s"), "s", f"<= {fmt(timeout_s)} s",
                                  j.get("hostname", "")))
        else:
            host = expected_hosts[node] if expected_hosts and node < len(expected_hosts) else "hostname unknown"
            results.append(Result("rendezvous", node, FAIL, None, "s", f"<= {fmt(timeout_s)} s",
                                  f"node {node} ({host}) did not join within {fmt(timeout_s)} s"))
    return results


def check_reachability(reach: dict[int, dict[int, object]]) -> list[Result]:
    """reach: node -> {peer node: TCP connect time in ms, or the error}. Unreachable peers FAIL."""
    results = []
    for node, peers in sorted(reach.items()):
        if not peers:
            results.append(Result("tcp.reach", node, SKIP, detail="no other node to reach"))
            continue
        bad = [f"node {p}: {v}" for p, v in sorted(peers.items()) if _number(v) is None]
        ms = [v for v in peers.values() if _number(v) is not None]
        results.append(Result("tcp.reach", node, FAIL if bad else PASS, max(ms) if ms else None, "ms",
                              "every peer connects", "cannot reach " + "; ".join(bad) if bad
                              else "peers " + ",".join(str(p) for p in sorted(peers))))
    return results


# ----------------------------------------------------------------------------------------------
# 2. Software versions


def check_versions(versions: dict[int, dict[str, Optional[str]]]) -> list[Result]:
    """Every package must match what most nodes run; the odd node is named with both versions."""
    packages = sorted({p for v in versions.values() for p in v})
    odd: dict[int, list[str]] = {node: [] for node in versions}
    for pkg in packages:
        values = {node: v.get(pkg) for node, v in versions.items()}
        ref = reference_value(values)
        for node, value in values.items():
            if value != ref:
                odd[node].append(f"{pkg} {value} (others {ref})")
    return [Result("versions", node, FAIL if odd[node] else PASS, None, "", "identical on every node",
                   "; ".join(odd[node])) for node in sorted(versions)]


# ----------------------------------------------------------------------------------------------
# 3. Devices and host


def check_device_count(nodes: dict[int, dict]) -> list[Result]:
    """nodes: node -> {'nproc', 'device_count' (None on CPU), 'cpu_cores'}."""
    results = []
    for node, n in sorted(nodes.items()):
        nproc, count = n["nproc"], n.get("device_count")
        if count is None:  # CPU: processes share cores
            cores = n["cpu_cores"]
            status = WARN if cores < nproc else PASS
            detail = f"{cores} cores for {nproc} processes" + (": oversubscribed" if cores < nproc else "")
            results.append(Result("devices.count", node, status, cores, "cores", f">= {nproc} processes", detail))
            continue
        status = FAIL if count < nproc else WARN if count > nproc else PASS
        detail = {FAIL: f"only {count} devices for {nproc} processes", WARN: f"{count - nproc} devices left idle",
                  PASS: ""}[status]
        results.append(Result("devices.count", node, status, count, "devices", f"= {nproc} processes", detail))
    return results


def check_device_memory(free_bytes: dict[int, object], node_of: dict[int, int],
                        need_bytes: Optional[int]) -> list[Result]:
    """Free memory of each rank's device against the per-device need; no need known: report only.
    No straggler rule here: free memory legitimately differs, and only the need matters."""
    threshold = (f">= {fmt(need_bytes / GiB)} GiB" if need_bytes
                 else "no need known (--config + planner, or --min-free-memory-gb)")
    results = []
    for node in sorted(set(node_of[r] for r in free_bytes)):
        mine = {r: v for r, v in free_bytes.items() if node_of[r] == node}
        errors = [f"rank {r}: not measured ({v})" for r, v in sorted(mine.items()) if _number(v) is None]
        values = {r: v for r, v in mine.items() if _number(v) is not None}
        short = [f"rank {r}: {fmt(v / GiB)} GiB free" for r, v in sorted(values.items())
                 if need_bytes and v < need_bytes]
        results.append(Result("devices.memory", node, FAIL if errors or short else PASS,
                              min(values.values()) / GiB if values else None, "GiB", threshold,
                              "; ".join(errors + short)))
    return results


def check_host_memory(nodes: dict[int, dict], need_per_rank: Optional[int], min_gb: float) -> list[Result]:
    """nodes: node -> {'mem_available', 'nproc'}. Need: the per-rank need times the node's ranks
    (CPU training keeps everything in host memory), else the profile's minimum."""
    results = []
    for node, n in sorted(nodes.items()):
        need = need_per_rank * n["nproc"] if need_per_rank else min_gb * GiB
        have = n["mem_available"]
        results.append(Result("host.memory", node, FAIL if have < need else PASS, have / GiB, "GiB",
                              f">= {fmt(need / GiB)} GiB available",
                              f"only {fmt(have / GiB)} GiB available" if have < need else ""))
    return results


def check_gpu_health(health: dict[int, Optional[list[dict]]]) -> list[Result]:
    """NVML facts per device: uncorrectable ECC and pending/failed row remaps FAIL, throttling WARN.

    health: node -> list of {'index', 'ecc_uncorrected', 'remap_pending', 'remap_failure',
    'throttle': [reasons], 'xid': [lines]}, or None where NVML is not available (CPU, no driver).
    """
    results = []
    for node, devices in sorted(health.items()):
        if devices is None:
            results.append(Result("devices.health", node, SKIP, detail="no NVML (CPU or nvidia-ml-py missing)"))
            continue
        fails, warns = [], []
        for d in devices:
            i = d["index"]
            if d.get("ecc_uncorrected"):
                fails.append(f"gpu {i}: {d['ecc_uncorrected']} uncorrectable ECC errors")
            if d.get("remap_pending") or d.get("remap_failure"):
                state = "failed" if d.get("remap_failure") else "pending (reset needed)"
                fails.append(f"gpu {i}: HBM row remap {state}")
            if d.get("throttle"):
                warns.append(f"gpu {i}: throttled ({', '.join(d['throttle'])})")
            if d.get("xid"):
                warns.append(f"gpu {i}: Xid in kernel log: {d['xid'][-1]}")
        status = FAIL if fails else WARN if warns else PASS
        results.append(Result("devices.health", node, status, len(devices), "devices",
                              "no ECC/remap errors, no throttling", "; ".join(fails + warns)))
    return results


# ----------------------------------------------------------------------------------------------
# 4-5. Compute and communication


def check_per_rank(check: str, values: dict[int, object], node_of: dict[int, int], floor: Optional[float],
                   unit: str, rel: float = 0.1) -> list[Result]:
    """A per-rank throughput (GEMM, host-to-device copy): floor and stragglers, one Result per node."""
    return _per_node(check, values, node_of.__getitem__, floor, unit, lambda r: f"rank {r}", rel=rel)


def check_groups(kind: str, groups: list[dict], node_of: dict[int, int], intra_floor: float,
                 inter_floor: float, rel: float = 0.1) -> list[Result]:
    """All-reduce bus bandwidth per group (dicts with 'ranks', 'gbps'). A group inside one node is
    judged against the intra-node floor and reported on that node; a group spanning nodes against
    the inter-node floor, reported for the whole world (no single node is to blame)."""
    def node(i):
        nodes = {node_of[r] for r in groups[i]["ranks"]}
        return nodes.pop() if len(nodes) == 1 else None

    results = []
    for within in (True, False):  # NVLink and network groups are different populations
        idx = [i for i in range(len(groups)) if (node(i) is not None) == within]
        if not idx:
            continue
        results += _per_node(f"allreduce.{kind}", {i: groups[i]["gbps"] for i in idx}, node,
                             intra_floor if within else inter_floor, "GB/s",
                             lambda i: "ranks " + ",".join(map(str, groups[i]["ranks"])), fast_status=PASS, rel=rel)
    return results


def check_links(links: list[dict], node_of: dict[int, int], floor: float, rel: float = 0.1) -> list[Result]:
    """Send/recv bandwidth per link ({'src', 'dst', 'gbps'}), reported per node.

    A slow link has two ends; the node to blame is the common end. A node all of whose links are slow
    is FAIL; a node with some slow links (and some good ones) is WARN: the far end is the suspect.
    """
    def name(i):
        s, d = links[i]["src"], links[i]["dst"]
        return f"node {node_of[s]} -> node {node_of[d]} (rank {s}->{d})"

    judged = {}
    for inter in (False, True):  # NVLink and network links are different populations
        idx = [i for i, lk in enumerate(links) if (node_of[lk["src"]] != node_of[lk["dst"]]) == inter]
        numbers = {i: links[i]["gbps"] for i in idx if _number(links[i]["gbps"]) is not None}
        flagged, med = outliers(numbers, rel), _median(numbers)
        for i in idx:
            judged[i] = judge(links[i]["gbps"], floor, flagged.get(i), med, name(i), "GB/s", fast_status=PASS)
    numbers = {i: lk["gbps"] for i, lk in enumerate(links) if _number(lk["gbps"]) is not None}
    threshold = _threshold(floor, "GB/s", _median(numbers), len(numbers), rel)
    results = []
    for node in sorted(set(node_of.values())):
        mine = [i for i, lk in enumerate(links) if node in (node_of[lk["src"]], node_of[lk["dst"]])]
        if not mine:
            continue
        bad = [i for i in mine if judged[i][0] == FAIL]
        if bad and len(bad) == len(mine):
            status, detail = FAIL, "every link of this node is slow: " + "; ".join(judged[i][1] for i in bad)
        elif bad:
            status, detail = WARN, "slow link, far end suspect: " + "; ".join(judged[i][1] for i in bad)
        else:
            status, detail = worst(judged[i][0] for i in mine), "; ".join(judged[i][1] for i in mine if judged[i][1])
        values = [links[i]["gbps"] for i in mine if _number(links[i]["gbps"]) is not None]
        results.append(Result("p2p.links", node, status, min(values) if values else None, "GB/s", threshold, detail))
    return results


# ----------------------------------------------------------------------------------------------
# 6. Storage


def check_data_files(storage: dict[int, dict]) -> list[Result]:
    """Every dataset file present and readable on every node, with the same size and head/tail hash.

    storage: node -> {'files': {path: {'size', 'head', 'tail'} or {'error'}}}.
    """
    paths = sorted({p for s in storage.values() for p in s.get("files", {})})
    if not paths:
        return [Result("data.files", node, SKIP, detail="no data files in the config (synthetic data)")
                for node in sorted(storage)]
    problems: dict[int, list[str]] = {node: [] for node in storage}
    for path in paths:
        prints = {node: s["files"].get(path, {"error": "not checked"}) for node, s in storage.items()}
        good = {node: (p["size"], p["head"], p["tail"]) for node, p in prints.items() if "error" not in p}
        ref = reference_value(good) if good else None
        for node, p in prints.items():
            if "error" in p:
                problems[node].append(f"{path}: {p['error']}")
            elif good[node] != ref:
                what = "size" if good[node][0] != ref[0] else "content (head/tail sha256)"
                problems[node].append(f"{path}: {what} differs from the other nodes "
                                      f"({good[node][0]:,} vs {ref[0]:,} bytes)")
    return [Result("data.files", node, FAIL if problems[node] else PASS, len(paths), "files",
                   "present, same size and hash everywhere", "; ".join(problems[node]))
            for node in sorted(storage)]


def check_read_throughput(storage: dict[int, dict], floor_gbps: float) -> list[Result]:
    """storage: node -> {'read': {'bytes', 'seconds'} or None}. Judged by the floor alone: read speed
    between nodes differs with page cache and disk firmware, and only a node too slow to feed its
    ranks is a fault."""
    results = []
    for node, s in sorted(storage.items()):
        read = s.get("read")
        gbps = read["bytes"] / max(read["seconds"], 1e-9) / 1e9 if read else None
        r = Result("data.read", node, SKIP, gbps, "GB/s", f">= {fmt(floor_gbps)} GB/s")
        if not read or read["bytes"] < MIN_READ_BYTES:
            got = f"only {read['bytes'] / MiB:.1f} MiB of data" if read else "no data files"
            r.detail = f"{got}: not judged (needs {MIN_READ_BYTES // MiB} MiB)"
        else:
            r.status = FAIL if gbps < floor_gbps else PASS
            r.detail = f"{fmt(gbps)} GB/s < floor {fmt(floor_gbps)}" if r.status == FAIL else ""
        results.append(r)
    return results


def check_data_locality(storage: dict[int, dict]) -> list[Result]:
    """storage: node -> {'data_fs': {path: [mountpoint, fstype]}}; data on a shared filesystem WARNs."""
    results = []
    for node, s in sorted(storage.items()):
        fs = s.get("data_fs", {})
        if not fs:
            results.append(Result("data.local", node, SKIP, detail="no data files"))
            continue
        shared = [f"{p} on {t} ({m})" for p, (m, t) in sorted(fs.items()) if t in SHARED_FILESYSTEMS]
        results.append(Result("data.local", node, WARN if shared else PASS, None, "", "on local disk",
                              ("shared filesystem, copy to local disk: " + "; ".join(shared)) if shared else ""))
    return results


def check_checkpoint(storage: dict[int, dict]) -> list[Result]:
    """storage: node -> {'checkpoint': {'path', 'free', 'need', 'error'?} or None,
    'load': {'path', 'exists'} or None}. Free space below one checkpoint or a missing --load FAIL."""
    results = []
    for node, s in sorted(storage.items()):
        ck, load = s.get("checkpoint"), s.get("load")
        if ck is None and load is None:
            results.append(Result("checkpoint", node, SKIP, detail="no checkpoint save/load dir in the config"))
            continue
        problems, value, threshold = [], None, ""
        if ck is not None:
            if ck.get("error"):
                problems.append(f"{ck['path']}: {ck['error']}")
            else:
                value, threshold = ck["free"] / GiB, f">= {fmt(ck['need'] / GiB)} GiB free (one checkpoint)"
                if ck["free"] < ck["need"]:
                    problems.append(f"{ck['path']}: {fmt(ck['free'] / GiB)} GiB free < {fmt(ck['need'] / GiB)} GiB "
                                    f"for one checkpoint")
        if load is not None and not load["exists"]:
            problems.append(f"load dir {load['path']} does not exist on this node")
        results.append(Result("checkpoint", node, FAIL if problems else PASS, value, "GiB", threshold,
                              "; ".join(problems)))
    return results


def check_mounts(storage: dict[int, dict]) -> list[Result]:
    """storage: node -> {'mounts_required': {path: is a mount point}}."""
    results = []
    for node, s in sorted(storage.items()):
        req = s.get("mounts_required", {})
        if not req:
            results.append(Result("mounts", node, SKIP, detail="no --require-mount"))
            continue
        missing = [p for p, ok in sorted(req.items()) if not ok]
        results.append(Result("mounts", node, FAIL if missing else PASS, len(req) - len(missing), "mounted",
                              f"{len(req)} required", ("not mounted: " + ", ".join(missing)) if missing else ""))
    return results


# ----------------------------------------------------------------------------------------------
# Verdict


def bad_nodes(results: list[Result]) -> dict[Optional[int], list[str]]:
    """node (None: world) -> the FAIL reasons, one line per failed check."""
    bad: dict[Optional[int], list[str]] = {}
    for r in results:
        if r.status == FAIL:
            bad.setdefault(r.node, []).append(f"{r.check}: {r.detail or 'FAIL'}")
    return bad


def healthy_nodes(results: list[Result], nodes: Iterable[int]) -> list[int]:
    failed = {r.node for r in results if r.status == FAIL}
    return [n for n in sorted(nodes) if n not in failed]


def passed(results: list[Result]) -> bool:
    return all(r.status != FAIL for r in results)


# ----------------------------------------------------------------------------------------------
# All checks over one run's measurements


def evaluate(m: dict, profile) -> list[Result]:
    """Every check over the measurements the runner gathered (the --json-out 'measurements').

    m: nnodes, timeout_s, expected_hosts, need_bytes, nodes {node: facts}, reach {node: {peer: ms}},
    storage {node: facts}, layout {notes, tp_groups_span_nodes}, node_of_rank {rank: node},
    ranks {rank: {gemm_tflops, h2d_gbps, free_bytes}}, groups {tp|dp|world: [{ranks, gbps}]},
    links [{src, dst, gbps}], skipped (why the process-group checks did not run, or None).
    Node keys are node ranks (NODE_RANK), never renumbered.
    """
    nodes, node_of, ranks = m["nodes"], m["node_of_rank"], m["ranks"]
    results = check_rendezvous(m["nnodes"], nodes, m["timeout_s"], m.get("expected_hosts"))
    results += check_reachability(m["reach"])
    results += check_versions({k: n["versions"] for k, n in nodes.items()})
    results += check_device_count(nodes)
    on_gpu = profile.h2d_gbps is not None
    results += check_host_memory(nodes, None if on_gpu else m.get("need_bytes"), profile.min_host_memory_gb)
    results += check_gpu_health({k: n.get("gpu_health") for k, n in nodes.items()})
    if m.get("skipped"):
        results += [Result(c, None, SKIP, detail=f"not run: {m['skipped']}")
                    for c in ("compute.gemm", "allreduce.world", "p2p.links")]
    else:
        if on_gpu:
            results += check_device_memory({r: v["free_bytes"] for r, v in ranks.items()}, node_of, m.get("need_bytes"))
        results += check_per_rank("compute.gemm", {r: v["gemm_tflops"] for r, v in ranks.items()}, node_of,
                                  profile.gemm_tflops, "TFLOP/s", profile.compute_outlier_fraction)
        if on_gpu:
            results += check_per_rank("h2d.copy", {r: v["h2d_gbps"] for r, v in ranks.items()}, node_of,
                                      profile.h2d_gbps, "GB/s", profile.compute_outlier_fraction)
        for kind in ("tp", "dp", "world"):
            groups = m["groups"].get(kind, [])
            if groups:
                results += check_groups(kind, groups, node_of, profile.allreduce_intra_gbps,
                                        profile.allreduce_inter_gbps, profile.comm_outlier_fraction)
            else:
                results.append(Result(f"allreduce.{kind}", None, SKIP, detail="no group of 2 or more ranks"))
        if m["links"]:
            results += check_links(m["links"], node_of, profile.p2p_gbps, profile.comm_outlier_fraction)
        else:
            results.append(Result("p2p.links", None, SKIP, detail="no pipeline neighbours or second node"))
    storage = m["storage"]
    results += check_data_files(storage) + check_read_throughput(storage, profile.read_gbps)
    results += check_data_locality(storage) + check_checkpoint(storage) + check_mounts(storage)
    layout = m.get("layout", {})
    results.append(Result("layout", None, WARN if layout.get("tp_groups_span_nodes") else PASS, None, "",
                          "tensor-parallel groups inside a node", "; ".join(layout.get("notes", []))))
    return results
