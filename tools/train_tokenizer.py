#!/usr/bin/env python3
"""Train a LLaMA-format SentencePiece BPE tokenizer (byte fallback) on .jsonl ('text') or .txt files.

    python tools/train_tokenizer.py --input data/shakespeare.jsonl --vocab-size 4096 --output-prefix data/tok
"""

import argparse
import sys
import time
from pathlib import Path

from megallm.data.tokenizer import TokenizerError, load_tokenizer, train_tokenizer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl (key 'text') or .txt files")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.model")
    parser.add_argument("--max-sentences", type=int, default=300_000, help="lines sampled for training")
    args = parser.parse_args(argv)
    missing = [p for p in args.input if not Path(p).is_file()]
    if missing:
        print(f"error: {missing[0]}: input file not found", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        model = train_tokenizer(args.input, args.vocab_size, args.output_prefix, max_sentences=args.max_sentences)
    except TokenizerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # sentencepiece reports bad settings (e.g. a vocabulary too large) this way
        print(f"error: sentencepiece: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    tok = load_tokenizer(model)
    print(f"wrote {model}: {tok.vocab_size} tokens (bos {tok.bos}, eos/eod {tok.eod}) "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
