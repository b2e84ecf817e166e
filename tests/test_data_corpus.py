"""Tokenizer training, the demo corpus, and planted junk the stability tests can trace."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from data_helpers import VOCAB, corpus, data_config, data_dir, tokenizer_model, two_datasets, write_junk_dataset  # noqa: F401

from megallm.data.corpus import prepare_demo_corpus, shakespeare_texts
from megallm.data.dataset import build_datasets
from megallm.data.provenance import describe_samples, load_provenance
from megallm.data.tokenizer import load_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_tokenizer_is_llama_format_and_deterministic(corpus, tokenizer_model, tmp_path):
    tok = load_tokenizer(tokenizer_model)
    assert (tok.vocab_size, tok.bos, tok.eod, tok.pad) == (VOCAB, 1, 2, -1)
    text = "What's in a name? 1623 ☃ ꙮ"  # characters never seen in training: byte fallback
    ids = tok.tokenize(text)
    assert tok.detokenize(ids) == text and 0 not in ids  # no <unk>
    again = train_tokenizer([corpus], VOCAB, tmp_path / "again")
    assert again.read_bytes() == Path(tokenizer_model).read_bytes()


def test_train_tokenizer_cli(corpus, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tools/train_tokenizer.py"), "--input", str(corpus),
                          "--vocab-size", "600", "--output-prefix", str(tmp_path / "t")],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "600 tokens" in out.stdout
    assert load_tokenizer(tmp_path / "t.model").vocab_size == 600
    missing = subprocess.run([sys.executable, str(ROOT / "tools/train_tokenizer.py"), "--input", "nope.txt",
                              "--vocab-size", "600", "--output-prefix", str(tmp_path / "t")],
                         capture_output=True, text=True)
    assert missing.returncode == 2 and "nope.txt: input file not found" in missing.stderr


def test_demo_corpus_documents_carry_their_play_and_line(corpus):
    records = [json.loads(line) for line in corpus.read_text().splitlines()]
    plays = {p.name: p.read_text(encoding="utf-8", errors="replace").splitlines() for p in shakespeare_texts()[:8]}
    assert {r["source"].rsplit(":", 1)[0] for r in records} == set(plays)
    for r in records[::50]:
        name, line = r["source"].rsplit(":", 1)
        assert r["text"].splitlines()[0] == plays[name][int(line) - 1]
    sizes = [len(r["text"]) for r in records]
    assert 1000 < np.median(sizes) < 3000
    assert prepare_demo_corpus(corpus.parent, max_files=8, name=corpus.name) == corpus  # cached


def test_junk_documents_are_planted_and_traceable(two_datasets, tokenizer_model, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    clean = two_datasets[0]
    junk = write_junk_dataset(clean, str(tmp_path / "junk"), VOCAB, junk_docs=[0, 10, 11], junk_len=300, seed=1)
    before, after = IndexedDataset(clean), IndexedDataset(junk)
    assert len(after) == len(before) + 3
    assert np.array_equal(after[12], before[9]) and np.array_equal(after[1], before[0])
    assert len(after[10]) == 300 and int(after[10].max()) < VOCAB
    prov, clean_prov = load_provenance(junk), load_provenance(clean)
    assert [prov.source(i) for i in (0, 10, 11)] == ["junk:0", "junk:1", "junk:2"]
    assert prov.source(12) == clean_prov.source(9)
    cfg = data_config([junk], tokenizer_model, tmp_path / "cache", train_iters=20, global_batch_size=16)
    train = build_datasets(cfg)[0]
    hits = [d for d in describe_samples(train, range(len(train))) if any(s.startswith("junk:") for s in d["sources"])]
    assert hits and all(set(d["documents"]) & {0, 10, 11} for d in hits)


def test_prepare_demo_data_end_to_end(tmp_path):
    from megallm.data.check import check_data
    from megallm.data.corpus import prepare_demo_data

    prefix, model = prepare_demo_data(tmp_path, vocab_size=512, max_files=2)
    assert check_data([prefix], 512, str(model)) == [] and load_tokenizer(model).vocab_size == 512
    stamp = Path(prefix + ".idx").stat().st_mtime_ns
    assert prepare_demo_data(tmp_path, vocab_size=512, max_files=2) == (prefix, model)  # cached
    assert Path(prefix + ".idx").stat().st_mtime_ns == stamp
