"""The preflight's parts on their own: rank layout, storage facts, versions, registration with a
deadline (a real TCPStore in this process), report files, and the runner's small pieces."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest
from rich.console import Console

from megallm.config import load_yaml
from megallm.preflight import checks, facts, layout, rendezvous, report, run, storage
from megallm.preflight.checks import FAIL, PASS, Result
from tests.launch import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


# ---------------------------------------------------------------------------------------------- layout


def test_layout_without_config_is_one_tp_group_per_node_and_a_ring():
    lay = layout.plan_layout([2, 2, 2])
    assert (lay.tp, lay.pp) == (2, 1)
    assert lay.tp_groups == [[0, 1], [2, 3], [4, 5]]
    assert lay.dp_groups == [[0, 2, 4], [1, 3, 5]]
    assert lay.links == [(0, 2), (1, 3), (2, 4), (3, 5), (4, 0), (5, 1)]  # node k -> k+1, each local rank
    assert not lay.tp_groups_span_nodes


def test_layout_uses_config_tp_pp_and_pipeline_neighbours():
    lay = layout.plan_layout([2, 2], tp=1, pp=4)
    assert lay.links[:3] == [(0, 1), (1, 2), (2, 3)]  # stage i -> i+1
    assert set(lay.links[3:]) == {(0, 2), (2, 0), (1, 3), (3, 1)}  # ring over the 2 nodes
    assert len(lay.links) == len(set(lay.links))


def test_layout_falls_back_when_world_is_smaller_than_tp_x_pp():
    lay = layout.plan_layout([8], tp=8, pp=8)  # single-node preflight of the 70B layout
    assert (lay.tp, lay.pp) == (8, 1) and lay.tp_groups == [list(range(8))] and lay.links == []
    assert "does not fit tp x pp = 8 x 8" in lay.notes[0]
    lay = layout.plan_layout([2], tp=8, pp=8)  # on CPU: min(tp, local ranks)
    assert lay.tp == 2


def test_layout_notices_tp_groups_crossing_nodes():
    lay = layout.plan_layout([2, 2], tp=4, pp=1)
    assert lay.tp_groups_span_nodes and "span nodes" in lay.notes[-1]


def test_link_rounds_let_each_rank_send_and_receive_once():
    links = layout.plan_layout([2, 2], tp=1, pp=4).links
    rounds = layout.link_rounds(links, serial=False)
    assert sorted(lk for r in rounds for lk in r) == sorted(links)
    for rnd in rounds:
        assert len({s for s, _ in rnd}) == len(rnd) and len({d for _, d in rnd}) == len(rnd)
    assert layout.link_rounds(links, serial=True) == [[lk] for lk in links]


def test_node_of_rank_with_uneven_nodes():
    assert layout.node_of_rank([2, 1, 3]) == {0: 0, 1: 0, 2: 1, 3: 2, 4: 2, 5: 2}


# ---------------------------------------------------------------------------------------------- storage


def _config(tmp_path, extra=""):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.bin").write_bytes(bytes(range(256)) * (12 * 4096))  # 12 MiB
    (data / "a.idx").write_bytes(b"idx")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  data_path: ['0.7', '{data}/a', '0.3', '{data}/missing']\n"
                   f"checkpoint:\n  save: {tmp_path}/ckpt/run1\n  load: {tmp_path}/nothere\n{extra}")
    return load_yaml(cfg), data


def test_data_files_skip_blend_weights_and_add_tokenizer(tmp_path):
    cfg, data = _config(tmp_path)
    assert storage.data_files(cfg) == [f"{data}/a.bin", f"{data}/a.idx", f"{data}/missing.bin", f"{data}/missing.idx"]
    cfg.data.tokenizer_model = "tok.model"
    assert storage.data_files(cfg)[-1] == "tok.model"


def test_fingerprint_hashes_head_and_tail(tmp_path):
    p = tmp_path / "f.bin"
    body = os.urandom(3 * MiB)
    p.write_bytes(body)
    fp = storage.fingerprint(str(p))
    assert fp == {"size": 3 * MiB, "head": hashlib.sha256(body[:MiB]).hexdigest(),
                  "tail": hashlib.sha256(body[-MiB:]).hexdigest()}
    p.write_bytes(body[:-1] + bytes([body[-1] ^ 1]))  # one flipped bit at the end
    assert storage.fingerprint(str(p))["tail"] != fp["tail"]
    assert storage.fingerprint(str(tmp_path / "nope")) == {"error": "missing"}
    assert "not readable" in storage.fingerprint(str(tmp_path))["error"]


def test_read_throughput_reads_at_most_the_cap(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(os.urandom(5 * MiB))
    got = storage.read_throughput([str(p), str(tmp_path / "missing")], 3 * MiB)
    assert got["bytes"] == 3 * MiB and got["seconds"] > 0
    assert storage.read_throughput([str(tmp_path / "missing")], MiB) is None


MOUNTS = """/dev/sda1 / ext4 rw 0 0
server:/export /mnt/share nfs4 rw 0 0
/dev/sdb1 /mnt/share/local\\040disk xfs rw 0 0
"""


def test_mount_of_longest_prefix_and_escapes():
    mounts = storage.parse_mounts(MOUNTS)
    assert mounts[2] == ("/mnt/share/local disk", "xfs")
    assert storage.mount_of("/mnt/share/corpus.bin", mounts) == ("/mnt/share", "nfs4")
    assert storage.mount_of("/mnt/share/local disk/x", mounts) == ("/mnt/share/local disk", "xfs")
    assert storage.mount_of("/mnt/shared/x", mounts) == ("/", "ext4")


def test_checkpoint_need_is_16_bytes_per_parameter():
    cfg = load_yaml(os.path.join(ROOT, "configs", "llama2_7b.yaml"))
    assert storage.checkpoint_need_bytes(cfg, 1.0) == 6_738_415_616 * 16
    assert storage.checkpoint_need_bytes(cfg, 0.125) == 6_738_415_616 * 2


def test_storage_facts_from_a_config(tmp_path):
    cfg, data = _config(tmp_path)
    f = storage.storage_facts(cfg, ["/", str(tmp_path)], node_share=0.5, read_bytes=64 * MiB, mounts_text=MOUNTS)
    assert f["files"][f"{data}/a.bin"]["size"] == 12 * MiB
    assert f["files"][f"{data}/missing.bin"] == {"error": "missing"}
    assert f["read"]["bytes"] == 12 * MiB  # .bin files only
    assert f["data_fs"][f"{data}/a.bin"] == ["/", "ext4"]
    ck = f["checkpoint"]
    assert ck["need"] == storage.checkpoint_need_bytes(cfg, 0.5) and ck["free"] > 0  # local disk: this node's half
    assert f["load"] == {"path": f"{tmp_path}/nothere", "exists": False}
    assert f["mounts_required"] == {"/": True, str(tmp_path): False}
    assert storage.storage_facts(None, [], 1.0, MiB, MOUNTS)["files"] == {}


# ---------------------------------------------------------------------------------------------- facts


def test_fake_versions_hook():
    assert facts.parse_fake_versions("torch=2.0.0, apex = 1") == {"torch": "2.0.0", "apex": "1"}
    with pytest.raises(ValueError, match="pkg=version"):
        facts.parse_fake_versions("torch")
    v = facts.versions({facts.FAKE_VERSION_ENV: "megatron-core=0.1"})
    assert v["megatron-core"] == "0.1"
    assert set(v) == {"python", "torch", "cuda", "nccl", "megatron-core", "transformer-engine", "apex", "megallm",
                      "git_commit"}
    real = facts.versions({})
    assert real["megatron-core"] == "0.16.1" and real["torch"].startswith("2.13.0")


def test_mem_available_and_xid_filter(tmp_path):
    (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable:   2048 kB\n")
    assert facts.mem_available(str(tmp_path / "meminfo")) == 2048 * 1024
    lines = ["NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus", "NVRM: Xid (PCI:0000:5e:00): 13, x"]
    assert facts._xid_of_device(lines, b"00000000:3B:00.0") == lines[:1]


# ---------------------------------------------------------------------------------------------- rendezvous


def test_registration_names_missing_node_at_the_deadline():
    port = free_port()
    host = rendezvous.connect("127.0.0.1", port, True, 5)
    client = rendezvous.connect("127.0.0.1", port, False, 5)
    rendezvous.post(host, "node/0", {"hostname": "a", "nproc": 2})
    rendezvous.post(client, "node/2", {"hostname": "c", "nproc": 1})
    start = time.monotonic()
    roster = rendezvous.collect_roster(host, 3, start + 1.0, start)
    took = time.monotonic() - start
    assert 1.0 <= took < 2.0
    assert roster["present"] == [0, 2] and roster["nodes"]["2"]["hostname"] == "c"
    assert rendezvous.wait_for(client, "roster", 5) == roster
    assert rendezvous.roster_ranks(roster) == ([2, 1], {0: 0, 2: 2})
    with pytest.raises(TimeoutError, match="'verdict'"):
        rendezvous.wait_for(client, "verdict", 0.3)


def test_registration_returns_early_when_all_joined():
    port = free_port()
    host = rendezvous.connect("127.0.0.1", port, True, 5)
    rendezvous.post(host, "node/0", {"nproc": 1})
    start = time.monotonic()
    assert rendezvous.collect_roster(host, 1, start + 30, start)["present"] == [0]
    assert time.monotonic() - start < 1.0


def test_unreachable_master_is_a_clear_error():
    start = time.monotonic()
    with pytest.raises(rendezvous.MasterUnreachable, match=r"could not reach the preflight store at 127.0.0.1:\d+"):
        rendezvous.connect("127.0.0.1", free_port(), False, 1)
    assert time.monotonic() - start < 10


def test_listener_probe():
    listener = rendezvous.Listener()
    try:
        ms = rendezvous.probe("127.0.0.1", listener.port, 2)
        assert isinstance(ms, float) and ms < 1000
    finally:
        listener.close()
    refused = rendezvous.probe("127.0.0.1", free_port(), 2)
    assert isinstance(refused, str) and "ConnectionRefused" in refused
    assert rendezvous.own_address("127.0.0.1", 1) == "127.0.0.1"



# ---------------------------------------------------------------------------------------------- runner


def test_where_am_i_flags_over_torchrun_env():
    parser = run.build_parser()
    env = {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8", "WORLD_SIZE": "16", "GROUP_RANK": "1",
           "MASTER_ADDR": "n0", "MASTER_PORT": "29500"}
    w = run.where_am_i(parser.parse_args([]), env)
    assert (w.node, w.nnodes, w.local_rank, w.local_world, w.master_addr, w.port) == (1, 2, 1, 8, "n0", 29501)
    w = run.where_am_i(parser.parse_args(["--nnodes", "8", "--node-rank", "3", "--master-addr", "h",
                                          "--master-port", "4000"]), env)
    assert (w.node, w.nnodes, w.master_addr, w.port, w.host) == (3, 8, "h", 4000, False)


def test_merge_rank_reports_takes_the_slowest_member():
    lay = layout.plan_layout([2, 2])
    reports = {0: {"rank": {"gemm_tflops": 1.0}, "groups": [{"kind": "tp", "ranks": [0, 1], "gbps": 2.0}],
                   "links": [{"src": 3, "dst": 0, "gbps": 0.5}]},
               1: {"rank": {"gemm_tflops": 1.1}, "groups": [{"kind": "tp", "ranks": [0, 1], "gbps": 1.5}],
                   "links": []}}
    ranks, groups, links = run.merge_rank_reports(reports, 4, lay)
    assert ranks[1]["gemm_tflops"] == 1.1 and ranks[3]["gemm_tflops"] == "no report"
    assert groups == {"tp": [{"ranks": [0, 1], "gbps": 1.5}]}
    assert {(lk["src"], lk["dst"]): lk["gbps"] for lk in links}[(3, 1)] == "no report"
    assert {(lk["src"], lk["dst"]): lk["gbps"] for lk in links}[(2, 0)] == "no report"


def test_expected_hosts_and_memory_flag(tmp_path):
    (tmp_path / "hosts").write_text("a\nb\n")
    assert run.expected_hosts("a,b") == run.expected_hosts(f"@{tmp_path}/hosts") == ["a", "b"]
    args = run.build_parser().parse_args(["--min-free-memory-gb", "40"])
    assert run.memory_need(None, 8, args) == (40 << 30, "--min-free-memory-gb")
    assert run.memory_need(None, 8, run.build_parser().parse_args([]))[0] is None


def test_bad_config_is_a_usage_error(tmp_path, capsys):
    assert run.main(["--config", str(tmp_path / "none.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- report


RESULTS = [Result("compute.gemm", 0, PASS, 0.09, "TFLOP/s", ">= 0.005 TFLOP/s"),
           Result("compute.gemm", 1, FAIL, 0.03, "TFLOP/s", ">= 0.005 TFLOP/s", "rank 2: 0.03 TFLOP/s (straggler)"),
           Result("allreduce.world", None, PASS, 0.4, "GB/s", ">= 0.05 GB/s")]


def test_report_table_and_summary():
    console = Console(record=True, width=200)
    report.print_report(RESULTS, {0: "n0", 1: "n1"}, ["a note"], console=console)
    text = console.export_text()
    assert "FAIL 0.03 TFLOP/s" in text and "PASS 0.09 TFLOP/s" in text and "PASS 0.4 GB/s" in text
    assert "FAIL node 1 (n1): compute.gemm: rank 2: 0.03 TFLOP/s (straggler)" in text
    assert "note: a note" in text and "FAIL: 1/2 nodes fit (n0)" in text


def test_report_files_are_complete_and_atomic(tmp_path):
    out = tmp_path / "sub" / "pf.json"
    report.write_json(str(out), {"nodes": {0: {"x": 1}}}, RESULTS)
    doc = json.loads(out.read_text())
    assert doc["passed"] is False and doc["bad_nodes"] == {"1": ["compute.gemm: rank 2: 0.03 TFLOP/s (straggler)"]}
    assert doc["measurements"]["nodes"]["0"] == {"x": 1} and len(doc["results"]) == 3
    report.write_hosts(str(tmp_path / "hosts.txt"), RESULTS, {0: "n0", 1: "n1"})
    assert (tmp_path / "hosts.txt").read_text() == "n0\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["hosts.txt", "pf.json", "sub"]  # no temp files left
    assert checks.healthy_nodes(RESULTS, [0, 1]) == [0]
