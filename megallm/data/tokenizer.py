"""SentencePiece tokenizer of the LLaMA format: load any such model, or train a small BPE one.

A LLaMA-format model has unk=0, bos=1, eos=2 and no pad piece; our trained models follow it, so
the demo tokenizer and LLaMA2's own `tokenizer.model` are interchangeable everywhere below.

We wrap `sentencepiece` directly rather than megatron-core's tokenizer classes: preprocessing
workers tokenize in fresh processes, and importing megatron.core costs them ~6 s each. The wrapper
still offers what megatron's GPTDataset reads from a tokenizer (vocab_size, eod, pad,
unique_identifiers).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from megallm.files import atomic_write


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used; the message names the file."""


class Tokenizer:
    def __init__(self, path: str | Path):
        self.path = str(path)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(self.path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{self.path}: not a SentencePiece model ({' '.join(str(e).split())})") from None
        digest = hashlib.sha256(Path(self.path).read_bytes()).hexdigest()[:16]
        # megatron hashes this into its index-cache names: the same model in another place
        # reuses the cache, a different model does not.
        self.unique_identifiers = {"class": "SentencePieceTokenizer", "sha256": digest,
                                   "vocab_size": self.vocab_size}

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    @property
    def bos(self) -> int:
        return self._sp.bos_id()

    @property
    def pad(self) -> int:
        return self._sp.pad_id()  # -1 in LLaMA: no pad piece, megatron then pads with -1 and masks it

    def tokenize(self, text: str) -> list[int]:
        return self._sp.Encode(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # one thread: preprocessing parallelises over processes already
        return self._sp.Encode(list(texts), num_threads=1)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._sp.Decode([int(i) for i in ids])

    def __getstate__(self):
        return self.path

    def __setstate__(self, path):
        self.__init__(path)


def load_tokenizer(path: str | Path) -> Tokenizer:
    if not Path(path).is_file():
        raise TokenizerError(f"{path}: tokenizer model not found")
    return Tokenizer(path)


def iter_training_text(inputs: Sequence[str | Path], json_key: str = "text") -> Iterator[str]:
    """Lines of text from .jsonl (the `json_key` field of each object) or plain-text files.
    SentencePiece trains on sentences, and documents longer than its 4 KB line limit would be
    dropped, so documents are cut at newlines."""
    for path in inputs:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if str(path).endswith(".jsonl"):
                    try:
                        text = json.loads(line).get(json_key, "")
                    except (json.JSONDecodeError, AttributeError):
                        continue  # preprocessing names bad lines; training just needs text
                else:
                    text = line
                for piece in str(text).splitlines():
                    if piece.strip():
                        yield piece


def train_tokenizer(inputs: Sequence[str | Path], vocab_size: int, output_prefix: str | Path,
                    max_sentences: int = 300_000, seed: int = 1234) -> Path:
    """Train a LLaMA-format BPE model (byte fallback, digits split, no normalisation) and write
    `output_prefix.model` (under a temporary name, then renamed). Same inputs, same bytes."""
    model = Path(str(output_prefix) + ".model")
    if next(iter_training_text(inputs), None) is None:  # sentencepiece would only fail an internal assertion
        raise TokenizerError(f"{', '.join(map(str, inputs))}: no text to train a tokenizer on (empty, or .jsonl "
                             f"without a 'text' field); nothing was written")
    spm.set_random_generator_seed(seed)  # the sentence sample
    writer = io.BytesIO()  # not model_prefix=: the trainer would embed that path in the model
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter_training_text(inputs),
        model_writer=writer,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,  # every byte stays representable: no <unk> in training data
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=0.9995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # LLaMA's ids
        input_sentence_size=max_sentences,  # a sample is plenty for a small vocabulary
        shuffle_input_sentence=True,
        num_threads=1,  # deterministic, and faster than 2 threads on this corpus
        minloglevel=2,
    )
    return atomic_write(model, writer.getvalue())
