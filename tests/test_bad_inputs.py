"""Every bad file, flag or directory a user can hand the launcher, the tools and the preflight:
each must end with exit status 2, a short message naming the file/flag/rule and what to do, no
Python traceback, and nothing left behind where the command would have written.

One table; each row is run as its own subprocess, as a user would run it.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ["launch/pretrain_llama2.py", "--config", "configs/tiny.yaml"]
TINY_MODEL = {"num_layers": 4, "hidden_size": 128, "ffn_hidden_size": 352, "num_attention_heads": 8,
              "num_query_groups": 2, "vocab_size": 4096}


def write_dataset(prefix: Path, docs: list[list[int]]) -> str:
    """A megatron IndexedDataset (.bin/.idx, uint16 tokens, one sequence per document), written
    from its documented layout so that building the table needs no megatron import."""
    lengths = np.array([len(d) for d in docs], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths.astype(np.int64) * 2)[:-1]]).astype(np.int64) if docs else \
        np.zeros(0, np.int64)
    with open(f"{prefix}.bin", "wb") as f:
        for d in docs:
            f.write(np.asarray(d, dtype=np.uint16).tobytes())
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, len(docs), len(docs) + 1))
        f.write(lengths.tobytes() + pointers.tobytes() + np.arange(len(docs) + 1, dtype=np.int64).tobytes())
    return str(prefix)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """The bad (and a few good) inputs the table refers to by name."""
    d = tmp_path_factory.mktemp("bad_inputs")
    f = {"dir": str(d)}
    f["good"] = write_dataset(d / "good", [[1, 2, 3, 4, 5] * 40] * 20)
    f["empty"] = write_dataset(d / "empty", [])
    f["trunc_bin"] = write_dataset(d / "trunc_bin", [[7] * 100] * 10)
    Path(f["trunc_bin"] + ".bin").write_bytes(Path(f["trunc_bin"] + ".bin").read_bytes()[:1000])
    f["trunc_idx"] = write_dataset(d / "trunc_idx", [[7] * 100] * 10)
    Path(f["trunc_idx"] + ".idx").write_bytes(Path(f["trunc_idx"] + ".idx").read_bytes()[:60])
    (d / "not_a_tokenizer.model").write_text("this is not a sentencepiece model\n")
    f["bad_tok"] = str(d / "not_a_tokenizer.model")
    (d / "exclude_bad.txt").write_text("12\nseven\n")
    f["exclude_bad"] = str(d / "exclude_bad.txt")
    (d / "a_file").write_text("x\n")
    f["a_file"] = str(d / "a_file")
    # checkpoint directories: a garbage latest file, and a checkpoint of another model size
    garbage = d / "ckpt_garbage"
    garbage.mkdir()
    (garbage / "latest_checkpointed_iteration.txt").write_text("release\n")
    f["ckpt_garbage"] = str(garbage)
    other = d / "ckpt_other" / "iter_0000010"
    other.mkdir(parents=True)
    (other / "meta.json").write_text(json.dumps({"config": {"model": {**TINY_MODEL, "hidden_size": 256}}}))
    (other.parent / "latest_checkpointed_iteration.txt").write_text("10")
    f["ckpt_other"] = str(other.parent)
    hf = d / "hf_model"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    f["hf"] = str(hf)
    hf_bad = d / "hf_bad"
    hf_bad.mkdir()
    (hf_bad / "config.json").write_text("{not json")
    f["hf_bad"] = str(hf_bad)
    # configs
    for name, text in {"bad_yaml": "model: [unclosed\n", "unknown_field": "model:\n  hidden_sise: 64\n",
                       "wrong_type": "training:\n  micro_batch_size: two\n", "num_workers": "data:\n  num_workers: 4\n",
                       "tied": "model:\n  untie_embeddings_and_output_weights: false\n",
                       "not_mapping": "- a\n- b\n"}.items():
        (d / f"{name}.yaml").write_text(text)
        f[name] = str(d / f"{name}.yaml")
    (d / "empty.txt").write_text("")
    f["empty_txt"] = str(d / "empty.txt")
    (d / "empty.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    f["empty_jsonl"] = str(d / "empty.jsonl")
    (d / "runs_empty").mkdir()
    f["runs_empty"] = str(d / "runs_empty")
    (d / "runs_garbage").mkdir()
    (d / "runs_garbage" / "metrics.jsonl").write_text("not json at all\n")
    f["runs_garbage"] = str(d / "runs_garbage")
    return f


@pytest.fixture(scope="module")
def tokenizer(files) -> str:
    """A real (tiny) SentencePiece model, for the cases where only the input is bad."""
    from megallm.data.tokenizer import train_tokenizer

    text = Path(files["dir"]) / "tok_text.txt"
    text.write_text("".join(f"line {i} of some text, with words like alpha beta gamma {i * 7}\n" for i in range(400)))
    return str(train_tokenizer([text], 300, Path(files["dir"]) / "tok"))


@dataclass
class Case:
    name: str
    argv: Callable[[dict], list[str]]  # from the fixture's paths
    expect: str | Callable[[dict], str]  # in the message
    writes: Optional[Callable[[dict], str]] = None  # a path that must not exist afterwards
    module: bool = False  # argv[0] is a module for python -m
    max_lines: int = 2
    needs: list = field(default_factory=list)  # extra fixtures: "tokenizer"


CASES = [
    # --- the launcher: configs
    Case("config_missing", lambda f: [*LAUNCH[:1], "--config", "nope.yaml"], "nope.yaml: config file not found"),
    Case("config_bad_yaml", lambda f: [*LAUNCH[:1], "--config", f["bad_yaml"]], "bad_yaml.yaml:2: not valid YAML"),
    Case("config_not_mapping", lambda f: [*LAUNCH[:1], "--config", f["not_mapping"]], "expected a mapping of sections"),
    Case("config_unknown_field", lambda f: [*LAUNCH[:1], "--config", f["unknown_field"]],
         "unknown field 'model.hidden_sise'"),
    Case("config_wrong_type", lambda f: [*LAUNCH[:1], "--config", f["wrong_type"]],
         "field 'micro_batch_size' = 'two' is not a valid int"),
    Case("config_removed_field", lambda f: [*LAUNCH[:1], "--config", f["num_workers"]],
         "'data.num_workers' is not supported"),
    Case("config_tied_embeddings", lambda f: [*LAUNCH[:1], "--config", f["tied"]],
         "untie_embeddings_and_output_weights=false"),
    Case("flag_wrong_type", lambda f: [*LAUNCH, "--tp", "two"], "--tensor-model-parallel-size: field"),
    Case("flag_zero_batch", lambda f: [*LAUNCH, "--micro-batch-size", "0"], "micro_batch_size=0: must be at least 1"),
    Case("flag_layout", lambda f: [*LAUNCH, "--tp", "3"], "must be divisible by tensor_model_parallel_size=3",
         max_lines=4),
    Case("schedule_1f1b_with_vpp", lambda f: [*LAUNCH, "--vpp", "2", "--pp", "2", "--pipeline-schedule", "1f1b"],
         "pipeline_schedule=1f1b: runs one model chunk per pipeline rank", max_lines=3),
    Case("schedule_zero_bubble_without_vpp", lambda f: [*LAUNCH, "--pipeline-schedule", "zero_bubble"],
         "pipeline_schedule=zero_bubble: interleaves several model chunks"),
    Case("schedule_unknown", lambda f: [*LAUNCH, "--pipeline-schedule", "1f2b"], "pipeline_schedule='1f2b'"),
    Case("overlap_grad_reduce_zero_bubble", lambda f: [*LAUNCH, "--pp", "2", "--vpp", "2", "--pipeline-schedule",
                                                       "zero_bubble", "--overlap-grad-reduce"],
         "overlap_grad_reduce=true with pipeline_schedule=zero_bubble", max_lines=3),
    Case("overlap_param_gather_without_zero1", lambda f: [*LAUNCH, "--overlap-param-gather"],
         "overlap_param_gather=true: needs use_distributed_optimizer"),
    Case("ddp_bucket_size_zero", lambda f: [*LAUNCH, "--ddp-bucket-size", "0"],
         "ddp_bucket_size=0: must be at least 1"),
    Case("clip_grad_negative", lambda f: [*LAUNCH, "--clip-grad", "-1"], "clip_grad=-1.0: must be positive"),
    Case("split_not_numbers", lambda f: [*LAUNCH, "--split", "90,x,0"], "split='90,x,0': expected numbers"),
    Case("split_all_zero", lambda f: [*LAUNCH, "--split", "0,0,0"], "not all zero"),
    Case("log_interval_zero", lambda f: [*LAUNCH, "--log-interval", "0"], "log_interval=0: must be at least 1"),
    # --- the launcher: data
    Case("blend_weight_after_prefix", lambda f: [*LAUNCH, "--data-path", "A", "0.3", "B"],
         "--data-path A 0.3 B: a weight among prefixes"),
    Case("blend_odd_count", lambda f: [*LAUNCH, "--data-path", "0.5", f["good"], "0.5"], "not weight/prefix pairs"),
    Case("blend_negative_weight", lambda f: [*LAUNCH, "--data-path", "-1", f["good"]], "not a positive weight"),
    Case("data_missing", lambda f: [*LAUNCH, "--data-path", f["dir"] + "/nope"], "nope: missing"),
    Case("data_given_with_suffix", lambda f: [*LAUNCH, "--data-path", f["good"] + ".bin"],
         "give the prefix, without .bin/.idx"),
    Case("data_truncated_bin", lambda f: [*LAUNCH, "--data-path", f["trunc_bin"], "--skip-data-check"],
         "trunc_bin.bin: 1,000 bytes but the index needs 2,000"),
    Case("data_truncated_idx", lambda f: [*LAUNCH, "--data-path", f["trunc_idx"]], "trunc_idx.idx: 60 bytes"),
    Case("data_zero_documents", lambda f: [*LAUNCH, "--data-path", f["empty"]], "empty: no documents"),
    Case("data_zero_documents_in_blend", lambda f: [*LAUNCH, "--data-path", "0.5", f["good"], "0.5", f["empty"]],
         "empty: no documents"),
    Case("tokenizer_missing", lambda f: [*LAUNCH, "--data-path", f["good"], "--tokenizer-model", "nope.model"],
         "--tokenizer-model nope.model: no such file"),
    Case("tokenizer_garbage", lambda f: [*LAUNCH, "--data-path", f["good"], "--tokenizer-model", f["bad_tok"]],
         "not_a_tokenizer.model: not a SentencePiece model"),
    Case("exclude_missing", lambda f: [*LAUNCH, "--exclude-samples", "nope.txt"],
         "--exclude-samples nope.txt: no such"),
    Case("exclude_malformed", lambda f: [*LAUNCH, "--exclude-samples", f["exclude_bad"]],
         "exclude_bad.txt:2: expected a sample index"),
    # --- the launcher: checkpoint and log directories
    Case("load_garbage_latest", lambda f: [*LAUNCH, "--load", f["ckpt_garbage"]], "holds 'release', not an iteration"),
    Case("load_other_model", lambda f: [*LAUNCH, "--load", f["ckpt_other"]],
         "iter_0000010 holds another model: hidden_size=256 (run: 128)"),
    Case("load_missing", lambda f: [*LAUNCH, "--load", f["dir"] + "/no_ckpt"], "no_ckpt: no such directory"),
    Case("load_a_file", lambda f: [*LAUNCH, "--load", f["a_file"]], "a_file: is a file"),
    Case("load_hf_dir", lambda f: [*LAUNCH, "--load", f["hf"]], "a HuggingFace checkpoint, not a megallm one"),
    Case("save_a_file", lambda f: [*LAUNCH, "--save", f["a_file"]], lambda f: f"--save {f['a_file']}: is a file"),
    Case("log_dir_a_file", lambda f: [*LAUNCH, "--log-dir", f["a_file"]],
         lambda f: f"--log-dir {f['a_file']}: is a file"),
    Case("log_dir_under_a_file", lambda f: [*LAUNCH, "--log-dir", f["a_file"] + "/run"], "cannot be created"),
    # --- tools/preprocess_data.py, tools/train_tokenizer.py, tools/check_data.py
    Case("preprocess_empty_input", lambda f: ["tools/preprocess_data.py", "--input", f["empty_jsonl"],
                                              "--tokenizer-model", f["tok"], "--output-prefix", f["dir"] + "/pp_out",
                                              "--workers", "1", "--no-progress"],
         "no documents to write", writes=lambda f: f["dir"] + "/pp_out_text_document.bin", needs=["tokenizer"]),
    Case("preprocess_empty_file", lambda f: ["tools/preprocess_data.py", "--input", f["empty_txt"],
                                             "--tokenizer-model", f["tok"], "--output-prefix", f["dir"] + "/pp_txt",
                                             "--workers", "1", "--no-progress"],
         "empty.txt: no documents to write", writes=lambda f: f["dir"] + "/pp_txt_text_document.bin",
         needs=["tokenizer"]),
    Case("preprocess_missing_input", lambda f: ["tools/preprocess_data.py", "--input", "nope.jsonl",
                                                "--tokenizer-model", f["tok"], "--output-prefix", f["dir"] + "/pp2"],
         "nope.jsonl: input file not found", writes=lambda f: f["dir"] + "/pp2_text_document.bin", needs=["tokenizer"]),
    Case("preprocess_bad_tokenizer", lambda f: ["tools/preprocess_data.py", "--input", f["empty_jsonl"],
                                                "--tokenizer-model", f["bad_tok"],
                                                "--output-prefix", f["dir"] + "/pp3"],
         "not a SentencePiece model", writes=lambda f: f["dir"] + "/pp3_text_document.bin"),
    Case("tokenizer_empty_input", lambda f: ["tools/train_tokenizer.py", "--input", f["empty_txt"], "--vocab-size",
                                             "300", "--output-prefix", f["dir"] + "/tok_out/t"],
         "empty.txt: no text to train a tokenizer on", writes=lambda f: f["dir"] + "/tok_out"),
    Case("tokenizer_missing_input", lambda f: ["tools/train_tokenizer.py", "--input", "nope.txt", "--vocab-size",
                                               "300", "--output-prefix", f["dir"] + "/tok_out2/t"],
         "nope.txt: input file not found", writes=lambda f: f["dir"] + "/tok_out2"),
    Case("check_data_zero_documents", lambda f: ["tools/check_data.py", "--data-path", f["empty"], "--vocab-size",
                                                 "4096"], "no documents"),
    Case("check_data_bad_blend", lambda f: ["tools/check_data.py", "--data-path", "0.5", f["good"], "0.5",
                                            "--vocab-size", "4096"], "not weight/prefix pairs"),
    # --- tools/spike_report.py: log directories
    Case("report_missing_dir", lambda f: ["tools/spike_report.py", f["dir"] + "/no_run"], "no such log directory"),
    Case("report_no_metrics", lambda f: ["tools/spike_report.py", f["runs_empty"]], "no metrics to report on",
         writes=lambda f: f["runs_empty"] + "/report"),
    Case("report_garbage_metrics", lambda f: ["tools/spike_report.py", f["runs_garbage"]], "metrics.jsonl",
         writes=lambda f: f["runs_garbage"] + "/report"),
    # --- tools/convert_checkpoint.py: HuggingFace and megallm directories
    Case("convert_missing_input", lambda f: ["tools/convert_checkpoint.py", "--from", "hf", "--to", "megallm",
                                             "--input", f["dir"] + "/no_hf", "--output", f["dir"] + "/cv1"],
         "no_hf", writes=lambda f: f["dir"] + "/cv1"),
    Case("convert_bad_config_json", lambda f: ["tools/convert_checkpoint.py", "--from", "hf", "--to", "megallm",
                                               "--input", f["hf_bad"], "--output", f["dir"] + "/cv2"],
         "config.json", writes=lambda f: f["dir"] + "/cv2"),
    Case("convert_no_weights", lambda f: ["tools/convert_checkpoint.py", "--from", "hf", "--to", "megallm",
                                          "--input", f["hf"], "--output", f["dir"] + "/cv3"],
         "hf_model", writes=lambda f: f["dir"] + "/cv3"),
    Case("convert_garbage_latest", lambda f: ["tools/convert_checkpoint.py", "--from", "megallm", "--to", "hf",
                                              "--input", f["ckpt_garbage"], "--output", f["dir"] + "/cv4"],
         "latest_checkpointed_iteration.txt", writes=lambda f: f["dir"] + "/cv4"),
    Case("convert_bf16_megallm", lambda f: ["tools/convert_checkpoint.py", "--from", "hf", "--to", "megallm",
                                            "--input", f["hf"], "--output", f["dir"] + "/cv5", "--dtype", "bf16"],
         "--dtype bf16: megallm checkpoints hold", writes=lambda f: f["dir"] + "/cv5"),
    # --- tools/plan.py: layouts
    Case("plan_layout", lambda f: ["tools/plan.py", "--config", "configs/tiny.yaml", "--tp", "3", "--gpu", "cpu",
                                   "--gpus-per-node", "6"], "tensor_model_parallel_size=3", max_lines=4),
    Case("plan_no_nodes", lambda f: ["tools/plan.py", "--config", "configs/tiny.yaml", "--nodes", "0"],
         "--nodes and --gpus-per-node must be at least 1"),
    Case("plan_config_missing", lambda f: ["tools/plan.py", "--config", "nope.yaml"],
         "nope.yaml: config file not found"),
    Case("describe_bad_stage", lambda f: ["megallm.describe", "--config", "configs/tiny.yaml", "--stage", "5"],
         "--stage 5: must be a pipeline rank in 0..0", module=True),
    # --- the preflight (make preflight runs it under torchrun)
    Case("preflight_config_missing", lambda f: ["megallm.preflight", "--config", "nope.yaml"],
         "preflight: nope.yaml: config file not found", module=True),
    Case("preflight_config_unknown_field", lambda f: ["megallm.preflight", "--config", f["unknown_field"]],
         "unknown field 'model.hidden_sise'", module=True),
    Case("preflight_hosts_file_missing", lambda f: ["megallm.preflight", "--expected-hosts", "@nope.txt"],
         "nope.txt", module=True),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused(case: Case, files, request):
    paths = dict(files)
    if "tokenizer" in case.needs:
        paths["tok"] = request.getfixturevalue("tokenizer")
    argv = case.argv(paths)
    cmd = [sys.executable, *(["-m"] if case.module else []), *argv]
    env = {"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, **env})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    expect = case.expect(paths) if callable(case.expect) else case.expect
    assert expect in out, out[-3000:]
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) <= case.max_lines, out[-3000:]
    if case.writes:
        assert not Path(case.writes(paths)).exists(), f"{case.writes(paths)} was left behind"


def test_the_table_covers_every_tool():
    """A new tool (or the launcher, or the preflight) gets rows here before it ships."""
    named = {c.argv({k: "x" for k in ("dir", "good", "empty", "a_file", "tok", "bad_tok", "hf", "hf_bad",
                                      "ckpt_garbage", "ckpt_other", "runs_empty", "runs_garbage", "empty_txt",
                                      "empty_jsonl", "exclude_bad", "trunc_bin", "trunc_idx", "bad_yaml",
                                      "unknown_field", "wrong_type", "num_workers", "tied", "not_mapping")})[0]
             for c in CASES}
    tools = {f"tools/{p.name}" for p in (ROOT / "tools").glob("*.py")} - {"tools/demo.py"}
    assert tools <= named, tools - named
    assert {"launch/pretrain_llama2.py", "megallm.preflight"} <= named


def test_clip_grad_zero_means_no_clipping():
    """Megatron reads --clip-grad 0 as "no clipping"; it used to multiply every gradient by 0."""
    import torch

    from megallm.config import Config, apply_overrides, validate
    from megallm.parallel.data_parallel import clip_grads_

    assert validate(apply_overrides(Config(), {"clip_grad": 0}), 1) == []
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 3.0)
    clip_grads_([p.grad], 0.0, torch.tensor(6.0))
    assert p.grad.tolist() == [3.0] * 4
    clip_grads_([p.grad], 1.0, torch.tensor(6.0))
    assert p.grad.tolist() == pytest.approx([0.5] * 4, rel=1e-5)


@pytest.mark.slow
def test_refusal_reaches_the_user_under_torchrun_when_rank_0_starts_late():
    """Every rank refuses a bad config, and the first rank to exit makes torchrun end the others:
    with rank 0 starting 3 s late, a rank-0-only message used to be lost (a bare ChildFailedError)."""
    from tests.launch import torchrun

    for target in (["launch/pretrain_llama2.py", "--config", "configs/tiny.yaml", "--data-path", "A", "0.3", "B"],
                   ["-m", "megallm.preflight", "--config", "nope.yaml"]):
        proc = torchrun(2, "tests/distributed/late_rank0.py", "3", *target, timeout=300, check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, out[-3000:]
        expect = "a weight among prefixes" if target[0] != "-m" else "preflight: nope.yaml: config file not found"
        assert out.count(expect) == 1, out[-3000:]  # once per machine, not once per rank
        for ours in ("megallm", "launch", "tests"):  # no traceback from our code (torchrun prints its own)
            assert f'File "{ROOT / ours}' not in out, out[-3000:]
