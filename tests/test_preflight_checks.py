"""PASS/WARN/FAIL logic of every preflight check, on fake measurements (no torch, no network)."""

from __future__ import annotations

import pytest

from megallm.preflight import checks
from megallm.preflight.checks import FAIL, PASS, SKIP, WARN
from megallm.preflight.profiles import PROFILES, guess_profile

GiB = 1 << 30
NODE_OF = {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2}  # 3 nodes x 2 ranks


def by_node(results):
    return {r.node: r.status for r in results}


def one(results, node):
    return next(r for r in results if r.node == node)


# ---------------------------------------------------------------------------------------------- rules


def test_outlier_rule_uses_ten_percent_of_median_when_mad_is_small():
    # median 99.5, MAD 1.0 -> limit max(1.0, 9.95): only the 70 is out
    assert checks.outliers({0: 100, 1: 101, 2: 99, 3: 70}) == {3: "slow"}
    assert checks.outliers({0: 100, 1: 100, 2: 100, 3: 120}) == {3: "fast"}
    assert checks.outliers({0: 100, 1: 100, 2: 100, 3: 110}) == {}  # exactly 10% is not beyond


def test_outlier_rule_uses_mad_when_spread_is_wide():
    # median 30, deviations 20,10,0,10,20 -> MAD 10 > 3 (10%): only |dev| > 10 is out
    assert checks.outliers({"a": 10, "b": 20, "c": 30, "d": 40, "e": 50}) == {"a": "slow", "e": "fast"}


def test_outlier_rule_needs_three_samples_and_honours_rel():
    assert checks.outliers({0: 1.0, 1: 100.0}) == {}
    assert checks.outliers({0: 100, 1: 100, 2: 60}, rel=0.5) == {}  # 40% off: inside a 50% band
    assert checks.outliers({0: 100, 1: 100, 2: 40}, rel=0.5) == {2: "slow"}


def test_reference_value_is_majority_then_lowest_node():
    assert checks.reference_value({0: "a", 1: "b", 2: "b"}) == "b"
    assert checks.reference_value({0: "a", 1: "b"}) == "a"


# ---------------------------------------------------------------------------------------------- 1. rendezvous


def test_rendezvous_names_missing_node_and_its_expected_host():
    joined = {0: {"hostname": "n0", "joined_s": 0.01}, 1: {"hostname": "n1", "joined_s": 2.5}}
    results = checks.check_rendezvous(3, joined, 60, ["n0", "n1", "gpu-17"])
    assert by_node(results) == {0: PASS, 1: PASS, 2: FAIL}
    assert one(results, 2).detail == "node 2 (gpu-17) did not join within 60 s"
    assert one(results, 1).value == 2.5
    assert "hostname unknown" in one(checks.check_rendezvous(3, joined, 60), 2).detail


def test_reachability_fails_the_node_that_cannot_connect():
    reach = {0: {1: 0.4}, 1: {0: 0.5, 2: "ConnectionRefusedError: refused (10.0.0.3:4)"}, 2: {}}
    results = checks.check_reachability(reach)
    assert by_node(results) == {0: PASS, 1: FAIL, 2: SKIP}
    assert "cannot reach node 2" in one(results, 1).detail
    assert one(results, 0).value == 0.4


# ---------------------------------------------------------------------------------------------- 2. versions


def test_versions_name_the_odd_node_and_package():
    v = {"torch": "2.13.0", "megatron-core": "0.16.1", "git_commit": "abc"}
    results = checks.check_versions({0: v, 1: v | {"megatron-core": "0.15.0"}, 2: v})
    assert by_node(results) == {0: PASS, 1: FAIL, 2: PASS}
    assert one(results, 1).detail == "megatron-core 0.15.0 (others 0.16.1)"


def test_versions_missing_package_counts_as_different():
    results = checks.check_versions({0: {"apex": None}, 1: {"apex": "0.1"}, 2: {"apex": None}})
    assert by_node(results) == {0: PASS, 1: FAIL, 2: PASS}


# ---------------------------------------------------------------------------------------------- 3. devices


def test_device_count_against_processes():
    nodes = {0: {"nproc": 8, "device_count": 8}, 1: {"nproc": 8, "device_count": 7},
             2: {"nproc": 8, "device_count": 9}, 3: {"nproc": 2, "device_count": None, "cpu_cores": 1}}
    results = checks.check_device_count(nodes)
    assert by_node(results) == {0: PASS, 1: FAIL, 2: WARN, 3: WARN}
    assert one(results, 1).detail == "only 7 devices for 8 processes"
    assert "oversubscribed" in one(results, 3).detail


def test_device_memory_against_need():
    free = {0: 79 * GiB, 1: 30 * GiB, 2: 79 * GiB, 3: 78 * GiB}
    node_of = {0: 0, 1: 0, 2: 1, 3: 1}
    results = checks.check_device_memory(free, node_of, 40 * GiB)
    assert by_node(results) == {0: FAIL, 1: PASS}
    assert one(results, 0).detail == "rank 1: 30 GiB free" and one(results, 0).value == 30
    assert by_node(checks.check_device_memory(free, node_of, None)) == {0: PASS, 1: PASS}


def test_host_memory_need_scales_with_ranks():
    nodes = {0: {"mem_available": 3 * GiB, "nproc": 2}, 1: {"mem_available": 5 * GiB, "nproc": 2}}
    assert by_node(checks.check_host_memory(nodes, 2 * GiB, 1.0)) == {0: FAIL, 1: PASS}
    assert by_node(checks.check_host_memory(nodes, None, 4.0)) == {0: FAIL, 1: PASS}


def test_gpu_health_ecc_fails_throttle_warns():
    ok = {"index": 0, "ecc_uncorrected": 0, "throttle": [], "xid": []}
    health = {0: [ok], 1: [ok | {"ecc_uncorrected": 3}], 2: [ok | {"throttle": ["HwThermalSlowdown"]}],
              3: [ok | {"remap_pending": True}], 4: None}
    results = checks.check_gpu_health(health)
    assert by_node(results) == {0: PASS, 1: FAIL, 2: WARN, 3: FAIL, 4: SKIP}
    assert "3 uncorrectable ECC" in one(results, 1).detail


# ---------------------------------------------------------------------------------------------- 4. compute


def test_gemm_straggler_fails_its_node():
    tflops = {0: 0.090, 1: 0.091, 2: 0.089, 3: 0.090, 4: 0.030, 5: 0.092}
    results = checks.check_per_rank("compute.gemm", tflops, NODE_OF, 0.005, "TFLOP/s")
    assert by_node(results) == {0: PASS, 1: PASS, 2: FAIL}
    assert one(results, 2).value == 0.030
    assert "rank 4" in one(results, 2).detail and "straggler" in one(results, 2).detail


def test_gemm_floor_error_and_fast_outlier():
    results = checks.check_per_rank("compute.gemm", {0: 600.0, 1: 760.0, 2: 750.0, 3: 755.0, 4: 900.0,
                                                     5: "RuntimeError: CUDA error"}, NODE_OF, 675.0, "TFLOP/s")
    assert by_node(results) == {0: FAIL, 1: PASS, 2: FAIL}
    assert "600 TFLOP/s < floor 675" in one(results, 0).detail
    assert "not measured (RuntimeError: CUDA error)" in one(results, 2).detail
    fast = checks.check_per_rank("compute.gemm", {0: 750.0, 1: 760.0, 2: 755.0, 3: 900.0}, NODE_OF, 675.0, "TFLOP/s")
    assert by_node(fast) == {0: PASS, 1: WARN}


# ---------------------------------------------------------------------------------------------- 5. communication


def test_tp_group_inside_a_node_is_reported_on_that_node():
    groups = [{"ranks": [0, 1], "gbps": 470.0}, {"ranks": [2, 3], "gbps": 465.0}, {"ranks": [4, 5], "gbps": 300.0}]
    results = checks.check_groups("tp", groups, NODE_OF, 460.0, 46.0)
    assert by_node(results) == {0: PASS, 1: PASS, 2: FAIL}
    assert "300 GB/s < floor 460" in one(results, 2).detail


def test_group_outlier_within_the_relative_band():
    groups = [{"ranks": [0, 1], "gbps": 1.3}, {"ranks": [2, 3], "gbps": 1.2}, {"ranks": [4, 5], "gbps": 0.3}]
    assert by_node(checks.check_groups("tp", groups, NODE_OF, 0.05, 0.05, rel=0.5)) == {0: PASS, 1: PASS, 2: FAIL}
    groups[2]["gbps"] = 0.8  # 33% below: noise at 50%, a straggler at 10%
    assert by_node(checks.check_groups("tp", groups, NODE_OF, 0.05, 0.05, rel=0.5))[2] == PASS
    assert by_node(checks.check_groups("tp", groups, NODE_OF, 0.05, 0.05, rel=0.1))[2] == FAIL


def test_groups_spanning_nodes_are_judged_for_the_world_on_the_inter_node_floor():
    groups = [{"ranks": [0, 2, 4], "gbps": 40.0}, {"ranks": [1, 3, 5], "gbps": 47.0}]
    results = checks.check_groups("dp", groups, NODE_OF, 460.0, 46.0)
    assert [(r.node, r.status, r.value) for r in results] == [(None, FAIL, 40.0)]
    assert "ranks 0,2,4: 40 GB/s < floor 46" in results[0].detail


RING = [(0, 2), (2, 4), (4, 0), (1, 3), (3, 5), (5, 1)]


def _links(slow_node=None, slow=0.011, fast=2.0):
    return [{"src": s, "dst": d, "gbps": slow if slow_node in (NODE_OF[s], NODE_OF[d]) else fast} for s, d in RING]


def test_links_blame_the_common_end_of_the_slow_links():
    results = checks.check_links(_links(slow_node=2), NODE_OF, 0.1, rel=0.5)
    assert by_node(results) == {0: WARN, 1: WARN, 2: FAIL}
    assert one(results, 2).detail.startswith("every link of this node is slow")
    assert "node 1 -> node 2 (rank 2->4): 0.011 GB/s < floor 0.1" in one(results, 2).detail
    assert "far end suspect" in one(results, 0).detail
    assert one(results, 2).value == 0.011


def test_links_healthy_and_fast_outliers_pass():
    links = _links()
    links[0]["gbps"] = 3.5  # a shorter path is not a fault
    assert by_node(checks.check_links(links, NODE_OF, 0.1)) == {0: PASS, 1: PASS, 2: PASS}


def test_links_straggler_without_floor_breach():
    node_of = {k: k for k in range(5)}  # 5 nodes, 1 rank each, a ring: node 2 is on 1->2 and 2->3
    links = [{"src": k, "dst": (k + 1) % 5, "gbps": 1.2 if 2 in (k, (k + 1) % 5) else 2.0} for k in range(5)]
    results = checks.check_links(links, node_of, 0.1, rel=0.1)  # 40% below median 2.0
    assert by_node(results) == {0: PASS, 1: WARN, 2: FAIL, 3: WARN, 4: PASS}
    assert "(straggler)" in one(results, 2).detail


def test_links_majority_slow_is_left_to_the_floor():
    # 4 of the 6 ring links touch node 2: the median itself is slow, so no outlier; the floor decides
    links = _links(slow_node=2, slow=1.2)
    assert by_node(checks.check_links(links, NODE_OF, 0.1, rel=0.1)) == {0: PASS, 1: PASS, 2: PASS}
    assert by_node(checks.check_links(links, NODE_OF, 1.5, rel=0.1)) == {0: WARN, 1: WARN, 2: FAIL}


def test_links_two_nodes_cannot_tell_which_end():
    node_of = {0: 0, 1: 1}
    links = [{"src": 0, "dst": 1, "gbps": 0.01}, {"src": 1, "dst": 0, "gbps": 0.01}]
    assert by_node(checks.check_links(links, node_of, 0.1)) == {0: FAIL, 1: FAIL}


# ---------------------------------------------------------------------------------------------- 6. storage


FP = {"size": 100, "head": "h", "tail": "t"}


def test_data_files_missing_and_different_content_named():
    storage = {0: {"files": {"d.bin": FP, "d.idx": FP}},
               1: {"files": {"d.bin": FP | {"tail": "x"}, "d.idx": FP}},
               2: {"files": {"d.bin": {"error": "missing"}, "d.idx": FP | {"size": 99}}},
               3: {"files": {"d.bin": FP, "d.idx": FP}}}
    results = checks.check_data_files(storage)
    assert by_node(results) == {0: PASS, 1: FAIL, 2: FAIL, 3: PASS}
    assert one(results, 1).detail == "d.bin: content (head/tail sha256) differs from the other nodes (100 vs 100 bytes)"
    assert one(results, 2).detail == "d.bin: missing; d.idx: size differs from the other nodes (99 vs 100 bytes)"
    assert by_node(checks.check_data_files({0: {"files": {}}})) == {0: SKIP}


def test_read_throughput_floor_only():
    mib = 1 << 20
    storage = {0: {"read": {"bytes": 64 * mib, "seconds": 0.05}}, 1: {"read": {"bytes": 64 * mib, "seconds": 2.0}},
               2: {"read": {"bytes": 2 * mib, "seconds": 1.0}}, 3: {"read": None}}
    results = checks.check_read_throughput(storage, 0.05)
    assert by_node(results) == {0: PASS, 1: FAIL, 2: SKIP, 3: SKIP}
    assert one(results, 1).value == pytest.approx(64 * mib / 2.0 / 1e9)
    assert "only 2.0 MiB" in one(results, 2).detail


def test_data_on_shared_filesystem_warns():
    storage = {0: {"data_fs": {"d.bin": ["/", "ext4"]}}, 1: {"data_fs": {"d.bin": ["/mnt/share", "nfs4"]}}}
    results = checks.check_data_locality(storage)
    assert by_node(results) == {0: PASS, 1: WARN}
    assert "d.bin on nfs4 (/mnt/share)" in one(results, 1).detail


def test_checkpoint_space_and_load_dir():
    storage = {0: {"checkpoint": {"path": "/ck", "free": 2 * GiB, "need": 1 * GiB}, "load": None},
               1: {"checkpoint": {"path": "/ck", "free": GiB // 2, "need": 1 * GiB}, "load": None},
               2: {"checkpoint": None, "load": {"path": "/old", "exists": False}},
               3: {"checkpoint": {"path": "/ck", "error": "/ is not writable"}, "load": None},
               4: {}}
    results = checks.check_checkpoint(storage)
    assert by_node(results) == {0: PASS, 1: FAIL, 2: FAIL, 3: FAIL, 4: SKIP}
    assert "0.5 GiB free < 1 GiB" in one(results, 1).detail


def test_required_mounts():
    results = checks.check_mounts({0: {"mounts_required": {"/data": True}}, 1: {"mounts_required": {"/data": False}},
                                   2: {"mounts_required": {}}})
    assert by_node(results) == {0: PASS, 1: FAIL, 2: SKIP}
    assert one(results, 1).detail == "not mounted: /data"


# ---------------------------------------------------------------------------------------------- all together


def measurements(nnodes=3):
    ranks = {r: {"gemm_tflops": 0.09} for r in range(2 * nnodes)}
    node_facts = {k: {"hostname": f"n{k}", "joined_s": 0.1, "nproc": 2, "cpu_cores": 2, "device_count": None,
                      "mem_available": 8 * GiB, "versions": {"torch": "2.13.0"}, "gpu_health": None}
                  for k in range(nnodes)}
    return {"nnodes": nnodes, "timeout_s": 60, "expected_hosts": None, "need_bytes": None, "nodes": node_facts,
            "reach": {k: {(k + 1) % nnodes: 0.5} for k in range(nnodes)},
            "storage": {k: {"files": {}, "read": None, "data_fs": {}, "checkpoint": None, "load": None,
                            "mounts_required": {}} for k in range(nnodes)},
            "layout": {"notes": [], "tp_groups_span_nodes": False}, "node_of_rank": NODE_OF, "ranks": ranks,
            "groups": {"tp": [{"ranks": [2 * k, 2 * k + 1], "gbps": 1.5} for k in range(nnodes)],
                       "world": [{"ranks": list(range(6)), "gbps": 0.4}]},
            "links": _links(), "skipped": None}


def test_evaluate_healthy_then_one_fault():
    cpu = PROFILES["cpu"]
    results = checks.evaluate(measurements(), cpu)
    assert checks.passed(results)
    assert not [r for r in results if r.status in (WARN, FAIL)]
    assert {r.check for r in results} >= {"rendezvous", "versions", "compute.gemm", "allreduce.tp", "allreduce.dp",
                                         "allreduce.world", "p2p.links", "data.files", "checkpoint", "mounts"}
    m = measurements()
    m["ranks"][4]["gemm_tflops"] = 0.03
    results = checks.evaluate(m, cpu)
    assert not checks.passed(results)
    assert list(checks.bad_nodes(results)) == [2]
    assert checks.healthy_nodes(results, range(3)) == [0, 1]


def test_evaluate_skips_collectives_when_connectivity_failed():
    m = measurements()
    m["skipped"], m["ranks"], m["groups"], m["links"] = "node 1 cannot reach node 2", {}, {}, []
    results = checks.evaluate(m, PROFILES["cpu"])
    skipped = {r.check: r.status for r in results if r.node is None}
    assert skipped["compute.gemm"] == SKIP and "node 1 cannot reach node 2" in next(
        r.detail for r in results if r.check == "p2p.links")


def test_profiles_guess():
    assert guess_profile(None) == ("cpu", None)
    assert guess_profile("NVIDIA H100 80GB HBM3")[0] == "h100"
    assert guess_profile("NVIDIA A100-SXM4-80GB")[0] == "a100"
    name, note = guess_profile("Tesla V100")
    assert name == "a100" and "unknown device" in note
    assert PROFILES["h100"].allreduce_intra_gbps == 460.0 and PROFILES["a100"].h2d_gbps == 24.0
