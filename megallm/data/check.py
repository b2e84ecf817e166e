"""Pre-training data check: every way a dataset can crash or poison training, found in seconds.

For each PREFIX (.bin/.idx in megatron-core's IndexedDataset format) it reports
  - missing files, an .idx whose size disagrees with its own header (truncated or not an index),
    sequence pointers that do not follow the lengths, a .bin shorter or longer than the index says;
  - token ids < 0 or >= the model's vocabulary (on GPU: `srcIndex < srcSelectDimSize`, hours in);
  - empty documents;
  - a tokenizer whose vocabulary exceeds the model's;
naming, for data findings, the document and its source file:line from the provenance sidecar.

The index is read here with numpy from the documented layout rather than with megatron's
_IndexReader: that one asserts on a bad file instead of saying what is wrong, and importing
megatron.core takes ~6 s where this check should answer in about one. The token scan is one
vectorised min/max per chunk of the memory-mapped .bin; only a chunk that fails is searched.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from megallm.data.provenance import document_source

INDEX_MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = 34  # magic 9, version 8, dtype code 1, sequence count 8, document count 8
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
SCAN_TOKENS = 1 << 24  # 16M tokens (32-64 MB) per vectorised pass
MAX_NAMED = 5  # documents named per finding


class DataCheckError(RuntimeError):
    """Raised by require_clean_data; its message is the findings, one a line."""


@dataclass
class Index:
    dtype: type
    lengths: np.ndarray  # int32[S] tokens per sequence
    pointers: np.ndarray  # int64[S] byte offset of each sequence in .bin
    documents: np.ndarray  # int64[D+1] sequence index where each document starts


def read_index(prefix: str) -> tuple[Optional[Index], list[str]]:
    """(index, []) or (None, [what is wrong with PREFIX.idx])."""
    path = prefix + ".idx"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header = f.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES or header[:9] != INDEX_MAGIC:
        return None, [f"{path}: not a megatron IndexedDataset index (bad header)"]
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", header[9:])
    if version != 1 or code not in DTYPES:
        return None, [f"{path}: unsupported index version {version} or dtype code {code}"]
    expected = HEADER_BYTES + 4 * n_seq + 8 * n_seq + 8 * n_doc
    if size != expected:
        return None, [f"{path}: {size:,} bytes but its header ({n_seq:,} sequences, {n_doc:,} document "
                      f"boundaries) needs {expected:,}: truncated, or written by another tool; re-run preprocessing"]
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    lengths = raw[HEADER_BYTES:HEADER_BYTES + 4 * n_seq].view(np.int32)
    pointers = raw[HEADER_BYTES + 4 * n_seq:HEADER_BYTES + 12 * n_seq].view(np.int64)
    documents = raw[HEADER_BYTES + 12 * n_seq:expected].view(np.int64)
    return Index(DTYPES[code], lengths, pointers, documents), []


def _document_of_sequences(index: Index, sequences: np.ndarray) -> np.ndarray:
    return np.searchsorted(index.documents, sequences, side="right") - 1


def _name_documents(prefix: str, index: Index, sequences: np.ndarray) -> str:
    """'3 documents: document 7 (a.jsonl:8), ...' for the documents holding these sequences."""
    return _named(prefix, np.unique(_document_of_sequences(index, sequences)))


def _named(prefix: str, docs: np.ndarray) -> str:
    named = ", ".join(f"document {d} ({document_source(prefix, int(d))})" for d in docs[:MAX_NAMED])
    more = f" and {len(docs) - MAX_NAMED} more" if len(docs) > MAX_NAMED else ""
    return f"{len(docs):,} document{'s' if len(docs) != 1 else ''}: {named}{more}"


def _structure(prefix: str, index: Index) -> list[str]:
    itemsize = np.dtype(index.dtype).itemsize
    n_seq = len(index.lengths)
    docs = index.documents
    if len(docs) == 0 or docs[0] != 0 or docs[-1] != n_seq or np.any(np.diff(docs) < 0):
        return [f"{prefix}.idx: document boundaries do not cover its {n_seq:,} sequences in order; "
                f"re-run preprocessing"]
    if np.any(index.lengths < 0):
        return [f"{prefix}.idx: negative sequence lengths; re-run preprocessing"]
    ends = np.cumsum(index.lengths, dtype=np.int64) * itemsize
    starts = ends - index.lengths.astype(np.int64) * itemsize
    bad = np.flatnonzero(index.pointers != starts)
    if len(bad):
        return [f"{prefix}.idx: sequence pointers disagree with the lengths from sequence {bad[0]} on, "
                f"in {_name_documents(prefix, index, bad)}; re-run preprocessing"]
    bin_size = os.path.getsize(prefix + ".bin")
    need = int(ends[-1]) if n_seq else 0
    if bin_size < need:
        cut = np.flatnonzero(ends > bin_size)
        return [f"{prefix}.bin: {bin_size:,} bytes but the index needs {need:,} (truncated copy?); "
                f"missing data in {_name_documents(prefix, index, cut)}"]
    if bin_size > need:
        return [f"{prefix}.bin: {bin_size:,} bytes but the index accounts for {need:,}: "
                f".bin and .idx are from different runs; re-run preprocessing"]
    return []


def _token_range(prefix: str, index: Index, vocab_size: int) -> list[str]:
    tokens = np.memmap(prefix + ".bin", dtype=index.dtype, mode="r") if len(index.lengths) else np.empty(0, index.dtype)
    can_be_negative = np.issubdtype(index.dtype, np.signedinteger) or np.issubdtype(index.dtype, np.floating)
    ends = np.cumsum(index.lengths, dtype=np.int64)
    too_big, negative = [], []
    high, low = np.iinfo(np.int64).min, 0
    for start in range(0, len(tokens), SCAN_TOKENS):
        chunk = tokens[start:start + SCAN_TOKENS]
        c_max = chunk.max()
        c_min = chunk.min() if can_be_negative else 0
        high, low = max(high, c_max), min(low, c_min)
        if c_max >= vocab_size:
            too_big.append(start + np.flatnonzero(chunk >= vocab_size))
        if c_min < 0:
            negative.append(start + np.flatnonzero(chunk < 0))
    findings = []
    for positions, what in ((too_big, f"token ids >= vocab size {vocab_size} (largest {high})"),
                            (negative, f"negative token ids (smallest {low})")):
        if positions:
            positions = np.concatenate(positions)
            sequences = np.searchsorted(ends, positions, side="right")
            findings.append(f"{prefix}: {len(positions):,} {what} in {_name_documents(prefix, index, sequences)}")
    return findings


def _empty_documents(prefix: str, index: Index) -> list[str]:
    cumulative = np.concatenate([[0], np.cumsum(index.lengths, dtype=np.int64)])
    empty = np.flatnonzero(cumulative[index.documents[1:]] == cumulative[index.documents[:-1]])
    return [f"{prefix}: empty (no tokens) in {_named(prefix, empty)}"] if len(empty) else []


def _provenance(prefix: str, index: Index) -> list[str]:
    from megallm.data.provenance import provenance_for, sidecar_path

    prov = provenance_for(prefix)
    n_docs = len(index.documents) - 1
    if prov is not None and len(prov) != n_docs:
        return [f"{sidecar_path(prefix)}: {len(prov):,} rows but the index has {n_docs:,} documents "
                f"(stale sidecar from another run); re-run preprocessing"]
    return []


def check_headers(prefix: str) -> list[str]:
    """What can be told without reading the tokens: both files present, the index whole and
    consistent with the .bin, and at least one document. Fast enough for every rank at launch."""
    missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
    if missing:
        hint = " (give the prefix, without .bin/.idx)" if prefix.endswith((".bin", ".idx")) else ""
        return [f"{prefix}: missing {' and '.join(missing)}{hint}"]
    index, findings = read_index(prefix)
    if index is None:
        return findings
    findings = _structure(prefix, index) + _provenance(prefix, index)
    if not findings and len(index.documents) <= 1:
        findings = [f"{prefix}: no documents (an empty dataset); preprocess non-empty input, or drop it from "
                    f"--data-path"]
    return findings


def check_prefix(prefix: str, vocab_size: int) -> list[str]:
    findings = check_headers(prefix)
    if findings:  # token positions mean nothing in a file that does not match its index
        return findings
    index, _ = read_index(prefix)
    return _token_range(prefix, index, vocab_size) + _empty_documents(prefix, index)


def check_tokenizer(tokenizer_model: str, vocab_size: int) -> list[str]:
    from megallm.data.tokenizer import TokenizerError, load_tokenizer

    try:
        tok = load_tokenizer(tokenizer_model)
    except TokenizerError as e:
        return [str(e)]
    if tok.vocab_size > vocab_size:
        return [f"{tokenizer_model}: tokenizer has {tok.vocab_size:,} tokens but the model's vocabulary is "
                f"{vocab_size:,}: ids {vocab_size}..{tok.vocab_size - 1} would index past the embedding; "
                f"set --vocab-size {tok.vocab_size} or use the model's own tokenizer"]
    return []


def strip_weights(data_path: Sequence[str]) -> list[str]:
    """Prefixes of a Megatron blend ["0.7", "A", "0.3", "B"] (or a plain list of prefixes)."""
    from megallm.data.blend import parse_blend

    return parse_blend(list(data_path))[0]


def check_data(prefixes: Sequence[str], vocab_size: int, tokenizer_model: Optional[str] = None) -> list[str]:
    """Findings, one line each (empty: clean). `prefixes` may be a weighted blend."""
    findings = check_tokenizer(str(tokenizer_model), vocab_size) if tokenizer_model else []
    for prefix in strip_weights(prefixes):
        findings += check_prefix(prefix, vocab_size)
    return findings


def require_clean_data(prefixes: Sequence[str], vocab_size: int, tokenizer_model: Optional[str] = None) -> None:
    findings = check_data(prefixes, vocab_size, tokenizer_model)
    if findings:
        raise DataCheckError("\n".join(findings))
