"""check_data: every finding names the dataset and the source file:line of the bad document."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from data_helpers import VOCAB, corpus, data_dir, mistral_tokenizer_model, tokenizer_model  # noqa: F401

from megallm.data.check import DataCheckError, check_data, require_clean_data
from megallm.data.preprocess import preprocess
from megallm.data.provenance import Provenance, sidecar_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def small(tokenizer_model, tmp_path):
    """Five documents; document 3 (line 4) holds the rarest, highest token ids."""
    src = tmp_path / "small.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                           ["to be", "or not", "to be that", "Zounds, qu'ay-je fait? ☃ 1999", "is the question"]))
    return preprocess([src], tokenizer_model, tmp_path / "small").outputs["text"], src


def _copy(prefix, new):
    for ext in (".bin", ".idx", ".prov.npz"):
        shutil.copy(prefix + ext, new + ext)
    return new


def _write(prefix, docs, dtype, sources):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(np.asarray(doc), [len(doc)])
    builder.finalize(prefix + ".idx")
    Provenance(["made.jsonl"], np.zeros(len(docs), np.int32), np.array(sources, np.int64)).save(sidecar_path(prefix))
    return prefix


def test_clean_data_has_no_findings(small, tokenizer_model):
    prefix, _ = small
    assert check_data([prefix], VOCAB, tokenizer_model) == []
    assert check_data(["0.5", prefix, "0.5", prefix], VOCAB) == []  # a Megatron blend is fine too


def test_vocabulary_smaller_than_tokenizer_names_file_and_line(small, tokenizer_model):
    prefix, src = small
    from megallm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_model)
    ids = [tok.tokenize(json.loads(line)["text"]) + [tok.eod] for line in src.read_text().splitlines()]
    vocab = max(ids[3]) - 1  # only document 3 holds an id this large... check the premise:
    assert [i for i, d in enumerate(ids) if max(d) >= vocab] == [3]
    findings = check_data([prefix], vocab, tokenizer_model)
    assert findings[0].startswith(f"{tokenizer_model}: tokenizer has {VOCAB:,} tokens but the model's "
                                  f"vocabulary is {vocab:,}")
    n_bad = sum(int(t >= vocab) for t in ids[3])
    assert findings[1] == (f"{prefix}: {n_bad:,} token ids >= vocab size {vocab} (largest {max(ids[3])}) "
                           f"in 1 document: document 3 ({src}:4)")
    with pytest.raises(DataCheckError) as e:  # what the launcher raises: the same lines
        require_clean_data([prefix], vocab, tokenizer_model)
    assert str(e.value) == "\n".join(findings)


def test_negative_and_empty_documents_are_named(tmp_path):
    prefix = _write(str(tmp_path / "made"), [[5, 6], [7, -3, 8], [], [1]], np.int32, [10, 20, 30, 40])
    assert check_data([prefix], 100) == [
        f"{prefix}: 1 negative token ids (smallest -3) in 1 document: document 1 (made.jsonl:20)",
        f"{prefix}: empty (no tokens) in 1 document: document 2 (made.jsonl:30)",
    ]


def test_truncated_and_mismatched_files(small, tmp_path):
    prefix, src = small
    cut = _copy(prefix, str(tmp_path / "cut"))
    size = Path(cut + ".bin").stat().st_size
    with open(cut + ".bin", "r+b") as f:
        f.truncate(size - 4)  # the last document loses two uint16 tokens
    [finding] = check_data([cut], VOCAB)
    assert finding.startswith(f"{cut}.bin: {size - 4:,} bytes but the index needs {size:,}")
    assert finding.endswith(f"in 1 document: document 4 ({src}:5)")

    grown = _copy(prefix, str(tmp_path / "grown"))
    with open(grown + ".bin", "ab") as f:
        f.write(b"\0\0")
    assert "are from different runs" in check_data([grown], VOCAB)[0]

    short_idx = _copy(prefix, str(tmp_path / "short_idx"))
    data = Path(short_idx + ".idx").read_bytes()
    Path(short_idx + ".idx").write_bytes(data[:-8])
    assert check_data([short_idx], VOCAB)[0].startswith(f"{short_idx}.idx: {len(data) - 8:,} bytes but its header")

    Path(short_idx + ".idx").write_bytes(b"garbage" * 10)
    assert check_data([short_idx], VOCAB) == [f"{short_idx}.idx: not a megatron IndexedDataset index (bad header)"]

    assert check_data([str(tmp_path / "absent")], VOCAB) == [
        f"{tmp_path / 'absent'}: missing {tmp_path / 'absent'}.bin and {tmp_path / 'absent'}.idx"]

    stale = _copy(prefix, str(tmp_path / "stale"))
    Provenance(["x"], np.zeros(2, np.int32), np.zeros(2, np.int64)).save(sidecar_path(stale))
    assert "2 rows but the index has 5 documents" in check_data([stale], VOCAB)[0]


def test_cli_exit_codes(small, tokenizer_model):
    prefix, src = small
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "tools/check_data.py"), *map(str, a)],
                                    capture_output=True, text=True)
    clean = run("--data-path", prefix, "--vocab-size", VOCAB, "--tokenizer-model", tokenizer_model)
    assert clean.returncode == 0 and "0 findings" in clean.stdout
    bad = run("--data-path", prefix, "--vocab-size", 300)
    assert bad.returncode == 2 and f"({src}:1)" in bad.stdout
    usage = run("--data-path", prefix, "0.5", "--vocab-size", 300)
    assert usage.returncode == 2 and "a weight among prefixes" in usage.stderr


def test_scan_speed(tmp_path):
    """The check reads tokens at memory speed (target >= 100M tokens/s; bench/bench_data.py
    measures it). Here a loose floor that a loaded 2-core CI machine still meets."""
    import time

    n_docs, doc_len = 2_000, 10_000  # 20M tokens
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "speed")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    doc = np.arange(doc_len, dtype=np.uint16) % 4096
    for _ in range(n_docs):
        builder.add_document(doc, [doc_len])
    builder.finalize(prefix + ".idx")
    check_data([prefix], 4096)  # page cache warm, as before a training start
    start = time.perf_counter()
    assert check_data([prefix], 4096) == []
    assert n_docs * doc_len / (time.perf_counter() - start) > 20e6


def test_production_tokenizer(tmp_path):
    model = mistral_tokenizer_model()
    if model is None:
        pytest.skip("mistral-common (for its 32000-token LLaMA-format tokenizer) is not installed; "
                    "`make venv` installs it")
    from megallm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(model)
    assert (tok.vocab_size, tok.bos, tok.eod, tok.pad) == (32000, 1, 2, -1)
    text = "The quick brown fox jumps over the lazy dog. Ünïcödé ☃ 12345"
    assert tok.detokenize(tok.tokenize(text)) == text
    src = tmp_path / "prod.jsonl"
    src.write_text("".join(json.dumps({"text": f"{text} #{i}"}) + "\n" for i in range(50)))
    prefix = preprocess([src], model, tmp_path / "prod", workers=2).outputs["text"]
    assert check_data([prefix], 32000, model) == []
    findings = check_data([prefix], 4096, model)
    assert findings[0].startswith(f"{model}: tokenizer has 32,000 tokens but the model's vocabulary is 4,096")
    assert f"document 0 ({src}:1)" in findings[1]
