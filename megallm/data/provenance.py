"""Where every document came from, and which documents every training sample holds.

Sidecar format: next to `PREFIX.bin` / `PREFIX.idx` lies `PREFIX.prov.npz` (numpy's savez) with
    files       str[F]        source names, as given on the command line ("a.jsonl", "junk", ...)
    file_index  int32[D]      for document d (= sequence d of the .idx), its source in `files`
    line        int64[D]      and its 1-based line number there (first line of a text block)
D is the index's document count, one sequence per document, so a document id from megatron's
GPTDataset (its document_index holds sequence ids) is a row here. A source reads "a.jsonl:1453".
Datasets made elsewhere (Megatron-LM's own preprocessing) have no sidecar; their documents read
"PREFIX document N".
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np

SUFFIX = ".prov.npz"


def sidecar_path(prefix: str | Path) -> str:
    return str(prefix) + SUFFIX


@dataclass
class Provenance:
    files: list[str]
    file_index: np.ndarray  # int32[D]
    line: np.ndarray  # int64[D]

    def __len__(self) -> int:
        return len(self.line)

    def source(self, document: int) -> str:
        return f"{self.files[self.file_index[document]]}:{int(self.line[document])}"

    def save(self, path: str | Path) -> None:
        """Write to `path` as is (callers write under a temporary name and rename)."""
        with open(path, "wb") as f:
            np.savez(f, files=np.array(self.files, dtype=str), file_index=self.file_index.astype(np.int32),
                     line=self.line.astype(np.int64))


def load_provenance(prefix: str | Path) -> Optional[Provenance]:
    path = sidecar_path(prefix)
    if not os.path.exists(path):
        return None
    with np.load(path) as z:
        return Provenance(files=[str(f) for f in z["files"]], file_index=z["file_index"], line=z["line"])


@lru_cache(maxsize=32)
def _cached_provenance(prefix: str, mtime: float) -> Optional[Provenance]:
    return load_provenance(prefix)


def provenance_for(prefix: str) -> Optional[Provenance]:
    """The sidecar of `prefix`, read once per version of the file."""
    path = sidecar_path(prefix)
    return _cached_provenance(prefix, os.path.getmtime(path) if os.path.exists(path) else -1.0)


def document_source(prefix: str, document: int) -> str:
    prov = provenance_for(prefix)
    if prov is None or document >= len(prov):
        return f"{prefix} document {document}"
    return prov.source(document)


def sample_documents(gpt_dataset, sample: int) -> list[int]:
    """Document ids (sequence ids of the IndexedDataset) a GPTDataset sample spans, read from its
    shuffle/sample/document indices the way GPTDataset.__getitem__ reads them, without the tokens."""
    i = int(gpt_dataset.shuffle_index[sample])
    begin, end = int(gpt_dataset.sample_index[i][0]), int(gpt_dataset.sample_index[i + 1][0])
    return [int(d) for d in gpt_dataset.document_index[begin:end + 1]]


def _resolve(dataset, index: int) -> tuple[object, int]:
    """Follow a blend down to (mid-level dataset, its sample index)."""
    if hasattr(dataset, "locate"):  # blend.ContinuedBlend
        return dataset.locate(index)
    if hasattr(dataset, "dataset_index"):  # megatron's BlendedDataset
        return dataset.datasets[int(dataset.dataset_index[index])], int(dataset.dataset_sample_index[index])
    return dataset, index


def describe_samples(dataset, indices: Sequence[int]) -> list[dict]:
    """For each dataset sample index: {"sample", "dataset", "documents", "sources"}."""
    out = []
    for idx in indices:
        inner, j = _resolve(dataset, int(idx))
        if not hasattr(inner, "sample_index"):  # synthetic data: no documents behind it
            out.append({"sample": int(idx), "dataset": getattr(inner, "name", type(inner).__name__),
                        "documents": [], "sources": []})
            continue
        prefix = inner.dataset.path_prefix
        docs = sample_documents(inner, j)
        out.append({"sample": int(idx), "dataset": prefix, "documents": docs,
                    "sources": [document_source(prefix, d) for d in docs]})
    return out
