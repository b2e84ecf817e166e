"""A Shakespeare corpus with junk documents planted at random lines, for the suspect-document test.

Four kinds of junk, each a JSONL line of its own like any other document:
    random_ids     uniformly random (non-byte) tokenizer pieces, decoded to text
    repeated       one word repeated a few hundred times (one token, over and over)
    other_script   words of another script (Cyrillic, Greek, Arabic or CJK letters)
    bytes_as_text  random bytes written as base64 or a hex dump
The tokenizer is trained on the clean corpus (a tokenizer is made before the data goes bad).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np

KINDS = ("random_ids", "repeated", "other_script", "bytes_as_text")
SCRIPTS = {"cyrillic": (0x0430, 0x044F), "greek": (0x03B1, 0x03C9), "arabic": (0x0627, 0x064A),
           "cjk": (0x4E00, 0x9FA5)}


def _words(rng, lo: int, hi: int, n_chars: int) -> str:
    out, size = [], 0
    while size < n_chars:
        word = "".join(chr(int(c)) for c in rng.integers(lo, hi + 1, int(rng.integers(2, 9))))
        out.append(word)
        size += len(word) + 1
    return " ".join(out)


def junk_text(kind: str, rng, sp) -> str:
    if kind == "random_ids":
        pieces = [i for i in range(sp.GetPieceSize()) if not (sp.IsByte(i) or sp.IsControl(i) or sp.IsUnknown(i))]
        return sp.DecodeIds([int(i) for i in rng.choice(pieces, 300)])
    if kind == "repeated":
        word = str(rng.choice(["the", "and", "lord", "thee", "good", "sir"]))
        return " ".join([word] * int(rng.integers(250, 400)))
    if kind == "other_script":
        lo, hi = SCRIPTS[str(rng.choice(list(SCRIPTS)))]
        return _words(rng, lo, hi, 300 if lo < 0x4E00 else 120)  # ~600 tokens: 2 bytes a letter, 3 for CJK
    if kind == "bytes_as_text":
        raw = rng.bytes(300)
        if rng.random() < 0.5:
            text = base64.b64encode(raw).decode("ascii")
            return "\n".join(text[i:i + 76] for i in range(0, len(text), 76))
        return "\n".join(f"{i:08x}: " + " ".join(f"{b:02x}" for b in raw[i:i + 16]) for i in range(0, len(raw), 16))
    raise ValueError(kind)


def plant(clean: Path, out: Path, tokenizer_model: Path, per_kind: int, seed: int = 0) -> dict[int, str]:
    """Write `out`: the lines of `clean` with per_kind documents of each kind inserted at random
    lines. Returns {1-based line in out: kind} of the planted documents."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    rng = np.random.default_rng(seed)
    lines = clean.read_text().splitlines()
    kinds = [k for k in KINDS for _ in range(per_kind)]
    n_out = len(lines) + len(kinds)
    positions = sorted(int(p) for p in rng.choice(n_out, len(kinds), replace=False))
    order = rng.permutation(len(kinds))
    planted = {p + 1: kinds[k] for p, k in zip(positions, order)}
    source, written = iter(lines), []
    for line in range(1, n_out + 1):
        if line in planted:
            written.append(json.dumps({"text": junk_text(planted[line], rng, sp), "source": f"junk:{planted[line]}"}))
        else:
            written.append(next(source))
    out.write_text("\n".join(written) + "\n")
    return planted


def build_and_train(tmp: Path, max_files: int, per_kind: int, overrides: dict, seed: int = 0,
                    timeout: int = 1800) -> dict:
    """Corpus of the first `max_files` plays -> tokenizer (clean text) -> junk planted -> preprocessed
    -> the tiny model trained for one pass over it on 8 ranks (tp 2 x pp 2 x dp 2). Returns
    {"log_dir", "planted": {source: kind}, "clean": [sources], "run": the worker's result}."""
    from megallm.config import load_yaml
    from megallm.data.corpus import prepare_demo_corpus
    from megallm.data.preprocess import preprocess
    from megallm.data.provenance import load_provenance
    from megallm.data.tokenizer import train_tokenizer
    from tests.launch import ROOT, run_scenarios

    clean = prepare_demo_corpus(tmp, max_files=max_files, name="plays.jsonl")
    tok = train_tokenizer([clean], 4096, tmp / "tok")
    corpus = tmp / "corpus.jsonl"
    planted_lines = plant(clean, corpus, tok, per_kind, seed)
    summary = preprocess([corpus], tok, tmp / "corpus", workers=1)
    prefix = summary.outputs["text"]
    prov = load_provenance(prefix)
    sources = [prov.source(d) for d in range(len(prov))]
    planted = {s: planted_lines[int(s.rsplit(":", 1)[1])] for s in sources if int(s.rsplit(":", 1)[1]) in planted_lines}
    cfg = load_yaml(ROOT / "configs/tiny.yaml")
    seq, gbs = overrides.get("seq_length", cfg.training.seq_length), cfg.training.global_batch_size
    iters = (summary.tokens - 1) // seq // gbs  # one pass: every sample of the first epoch once
    log_dir = tmp / "log"
    run = run_scenarios(8, tmp, [{"name": "junk", "overrides": {
        "tp": 2, "pp": 2, "train_iters": iters, "data_path": [prefix], "tokenizer_model": str(tok),
        "data_cache_path": str(tmp / "cache"), "eval_interval": 0, "log_dir": str(log_dir), **overrides}}],
        timeout=timeout)["junk"]
    return {"log_dir": log_dir, "planted": planted, "clean": [s for s in sources if s not in planted], "run": run,
            "iterations": iters, "tokens": summary.tokens}
