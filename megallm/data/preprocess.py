"""Documents (JSONL or plain text) -> megatron-core IndexedDataset (.bin/.idx) + provenance sidecar.

Output for each JSON key K: `{output_prefix}_{K}_document.{bin,idx}` written by megatron-core's own
IndexedDatasetBuilder (so Megatron-LM reads ours and we read theirs), plus `.prov.npz` (see
provenance.py). One document is one sequence. Documents keep input order whatever the number of
workers, so the files are byte-identical for any `workers`.

Bad input lines (not UTF-8, not JSON, not an object, key missing or not a string) stop with
`file:line: what` (on_error="stop") or are counted and skipped ("skip"). Blank lines are not
documents. Documents that tokenize to nothing are dropped and counted: they carry no signal and
megatron's sample index does not expect them.

Everything is written under temporary names and renamed at the end (.idx last), so an error or
Ctrl-C never leaves a partial .bin/.idx pair, and an older complete pair stays as it was.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from megallm.data.provenance import SUFFIX, Provenance, sidecar_path
from megallm.data.tokenizer import load_tokenizer

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt",)
MAX_EXAMPLES = 5


class PreprocessError(ValueError):
    """Input that cannot be preprocessed; the message names file:line and what is wrong."""


def output_prefix_for(output_prefix: str | Path, key: str) -> str:
    return f"{output_prefix}_{key}_document"  # Megatron-LM's naming


@dataclass
class PreprocessSummary:
    outputs: dict  # json key -> output prefix
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    skipped: int = 0
    skipped_examples: list = field(default_factory=list)
    empty: int = 0
    empty_examples: list = field(default_factory=list)

    def __str__(self) -> str:
        seconds = max(self.seconds, 1e-9)
        rate = f"{self.documents / seconds:,.0f} docs/s, {self.bytes / 1e6 / seconds:.1f} MB/s"
        lines = [f"{self.documents:,} documents, {self.tokens:,} tokens from {self.bytes / 1e6:.1f} MB "
                 f"in {self.seconds:.1f} s ({rate})"]
        lines += [f"wrote {p}.bin, .idx, {SUFFIX}" for p in self.outputs.values()]
        if self.skipped:
            lines.append(f"skipped {self.skipped} bad lines, first: " + "; ".join(self.skipped_examples))
        if self.empty:
            lines.append(f"dropped {self.empty} empty documents, first: " + ", ".join(self.empty_examples))
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Reading: the main process cuts inputs into chunks of raw records; workers decode and tokenize.


def _input_kind(path: str) -> str:
    if path.endswith(JSON_SUFFIXES):
        return "json"
    if path.endswith(TEXT_SUFFIXES):
        return "text"
    raise PreprocessError(f"{path}: unknown input type; use .jsonl (one JSON object a line) or .txt")


def _records(path: str, kind: str, txt_blocks: bool) -> Iterator[tuple[int, bytes]]:
    """(first line number, raw bytes) of each document. Raw bytes, so that invalid UTF-8 is
    reported by line instead of failing the whole file."""
    with open(path, "rb") as f:
        if kind == "text" and txt_blocks:
            block, first = [], 0
            for number, raw in enumerate(f, 1):
                if raw.strip():
                    first = first or number
                    block.append(raw)
                elif block:
                    yield first, b"".join(block).rstrip(b"\r\n")
                    block, first = [], 0
            if block:
                yield first, b"".join(block).rstrip(b"\r\n")
            return
        for number, raw in enumerate(f, 1):
            if raw.strip():
                yield number, raw.rstrip(b"\r\n")


@dataclass
class _Chunk:
    file_id: int
    file: str
    kind: str
    records: list  # [(line, raw bytes)]


def _chunks(inputs: Sequence[str], txt_blocks: bool, chunk_records: int, gate: threading.Semaphore,
            stop: threading.Event) -> Iterator[_Chunk]:
    for file_id, path in enumerate(inputs):
        kind = _input_kind(path)
        records = []
        for rec in _records(path, kind, txt_blocks):
            records.append(rec)
            if len(records) == chunk_records:
                gate.acquire()  # bounds the chunks in flight: the pool's feeder would read all input
                if stop.is_set():
                    return
                yield _Chunk(file_id, path, kind, records)
                records = []
        if records:
            gate.acquire()
            if stop.is_set():
                return
            yield _Chunk(file_id, path, kind, records)


_worker: dict = {}


def _init_worker(tokenizer_model: str, json_keys: tuple, append_eod: bool, prepend_bos: bool) -> None:
    tok = load_tokenizer(tokenizer_model)
    _worker.update(tok=tok, keys=json_keys, eod=tok.eod if append_eod else None,
                   bos=tok.bos if prepend_bos else None, dtype=np.int32)


def _init_pool_worker(*args) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    _init_worker(*args)


def _decode(chunk: _Chunk, line: int, raw: bytes) -> tuple[Optional[list[str]], Optional[str]]:
    """(texts per key, None) or (None, error message)."""
    where = f"{chunk.file}:{line}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line += raw.count(b"\n", 0, e.start)  # blocks span lines: name the one with the bad byte
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        return None, f"{chunk.file}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {column})"
    if chunk.kind == "text":
        return [text], None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"{where}: not valid JSON: {e.msg} (column {e.colno})"
    if not isinstance(obj, dict):
        return None, f"{where}: not a JSON object (got {type(obj).__name__})"
    texts = []
    for key in _worker["keys"]:
        if key not in obj:
            return None, f"{where}: no key '{key}' (keys: {', '.join(map(str, obj)) or 'none'})"
        if not isinstance(obj[key], str):
            return None, f"{where}: '{key}' is {type(obj[key]).__name__}, not a string"
        texts.append(obj[key])
    return texts, None


def _encode_chunk(chunk: _Chunk) -> tuple[int, str, int, list[tuple[int, str, object]]]:
    """(file id, file, bytes read, [(line, "ok", [ids per key]) | (line, "error", message) |
    (line, "empty", None)])."""
    decoded = [(line, *_decode(chunk, line, raw)) for line, raw in chunk.records]
    good = [(line, texts) for line, texts, err in decoded if err is None]
    flat = [t for _, texts in good for t in texts]
    ids = iter(_worker["tok"].tokenize_batch(flat))
    encoded = {line: [next(ids) for _ in texts] for line, texts in good}
    out = []
    for line, _, err in decoded:
        if err is not None:
            out.append((line, "error", err))
            continue
        docs = encoded[line]
        if any(len(d) == 0 for d in docs):
            out.append((line, "empty", None))
            continue
        bos, eod = _worker["bos"], _worker["eod"]
        docs = [np.asarray(([bos] if bos is not None else []) + d + ([eod] if eod is not None else []),
                           dtype=_worker["dtype"]) for d in docs]
        out.append((line, "ok", docs))
    return chunk.file_id, chunk.file, sum(len(raw) + 1 for _, raw in chunk.records), out


# ----------------------------------------------------------------------------------------------
# Writing


class _Outputs:
    """One megatron IndexedDatasetBuilder per key, under temporary names until commit()."""

    def __init__(self, output_prefix: str, json_keys: Sequence[str], vocab_size: int, inputs: Sequence[str]):
        with warnings.catch_warnings():  # megatron.core's import warns about absent GPU extras
            warnings.simplefilter("ignore")
            from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

        self.finals = {k: output_prefix_for(output_prefix, k) for k in json_keys}
        self.temps = {k: f"{p}.tmp-{os.getpid()}" for k, p in self.finals.items()}
        Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
        # uint16 below 65,500 tokens, else int32: what Megatron-LM's preprocessing picks
        dtype = DType.optimal_dtype(vocab_size)
        self.builders = {k: IndexedDatasetBuilder(t + ".bin", dtype=dtype) for k, t in self.temps.items()}
        self.inputs = list(inputs)
        self.file_ids, self.lines = [], []

    def add(self, file_id: int, line: int, docs: list[np.ndarray]) -> None:
        for builder, doc in zip(self.builders.values(), docs):
            builder.add_document(doc, [len(doc)])
        self.file_ids.append(file_id)
        self.lines.append(line)

    def commit(self) -> None:
        prov = Provenance(self.inputs, np.array(self.file_ids, dtype=np.int32), np.array(self.lines, dtype=np.int64))
        for key, tmp in self.temps.items():
            self.builders[key].finalize(tmp + ".idx")
            prov.save(sidecar_path(tmp))
        for key, tmp in self.temps.items():
            publish_dataset(tmp, self.finals[key])

    def discard(self) -> None:
        for key, tmp in self.temps.items():
            self.builders[key].data_file.close()
            remove_dataset(tmp)


DATASET_FILES = (SUFFIX, ".bin", ".idx")  # .idx last: a .bin/.idx pair is complete once it exists


def publish_dataset(tmp_prefix: str, prefix: str) -> None:
    for ext in DATASET_FILES:
        os.replace(tmp_prefix + ext, prefix + ext)


def remove_dataset(prefix: str) -> None:
    for ext in DATASET_FILES:
        if os.path.exists(prefix + ext):
            os.remove(prefix + ext)


def preprocess(inputs: Sequence[str | Path], tokenizer_model: str | Path, output_prefix: str | Path,
               json_keys: Sequence[str] = ("text",), append_eod: bool = True, workers: int = 1,
               on_error: str = "stop", txt_blocks: bool = False, prepend_bos: bool = False,
               progress: bool = False, chunk_records: int = 512) -> PreprocessSummary:
    """Tokenize `inputs` into one IndexedDataset per JSON key; see the module docstring."""
    if on_error not in ("stop", "skip"):
        raise PreprocessError(f"on_error={on_error!r}: must be 'stop' or 'skip'")
    inputs = [str(p) for p in inputs]
    json_keys = tuple(json_keys)
    for path in inputs:
        _input_kind(path)
        if not os.path.isfile(path):
            raise PreprocessError(f"{path}: input file not found")
    if any(_input_kind(p) == "text" for p in inputs) and len(json_keys) != 1:
        raise PreprocessError(f"plain-text inputs fill one dataset; got --json-keys {' '.join(json_keys)}")
    vocab_size = load_tokenizer(tokenizer_model).vocab_size
    summary = PreprocessSummary(outputs={k: output_prefix_for(output_prefix, k) for k in json_keys})
    total_bytes = sum(os.path.getsize(p) for p in inputs)
    init_args = (str(tokenizer_model), json_keys, append_eod, prepend_bos)
    in_flight = max(1, workers) * 4
    gate, stop = threading.Semaphore(in_flight), threading.Event()
    chunks = _chunks(inputs, txt_blocks, chunk_records, gate, stop)
    pool, outputs, bar, start = None, None, None, time.perf_counter()
    try:
        # megatron.core (for its builder) first: its import takes seconds, better spent before the
        # workers take the cores
        outputs = _Outputs(str(output_prefix), json_keys, vocab_size, inputs)
        if workers > 1:
            # spawn: workers import only sentencepiece and numpy, never the parent's torch/megatron
            pool = multiprocessing.get_context("spawn").Pool(workers, _init_pool_worker, init_args)
            results = pool.imap(_encode_chunk, chunks)
        else:
            _init_worker(*init_args)
            results = map(_encode_chunk, chunks)
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", smoothing=0.1)
        for file_id, file, chunk_bytes, chunk_results in results:
            gate.release()
            for line, status, payload in chunk_results:
                if status == "ok":
                    outputs.add(file_id, line, payload)
                    summary.documents += 1
                    summary.tokens += sum(len(d) for d in payload)
                elif status == "error":
                    if on_error == "stop":
                        raise PreprocessError(payload)
                    summary.skipped += 1
                    if len(summary.skipped_examples) < MAX_EXAMPLES:
                        summary.skipped_examples.append(payload)
                else:
                    summary.empty += 1
                    if len(summary.empty_examples) < MAX_EXAMPLES:
                        summary.empty_examples.append(f"{file}:{line}")
            if bar is not None:
                bar.update(chunk_bytes)
                bar.set_postfix_str(f"{summary.documents / (time.perf_counter() - start):,.0f} docs/s")
        if summary.documents == 0:  # a dataset of no documents would only fail later, at training
            raise PreprocessError(f"{', '.join(inputs)}: no documents to write ({summary.empty} empty, "
                                  f"{summary.skipped} skipped); nothing was written")
        outputs.commit()
    except BaseException:
        stop.set()
        for _ in range(in_flight + 1):
            gate.release()  # let a feeder blocked on the gate see `stop` and end
        if pool is not None:
            pool.terminate()
        if outputs is not None:
            outputs.discard()
        raise
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    summary.bytes = total_bytes
    summary.seconds = time.perf_counter() - start
    return summary
