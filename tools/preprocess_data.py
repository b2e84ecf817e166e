#!/usr/bin/env python3
"""Tokenize documents into megatron-core's IndexedDataset (.bin/.idx) with a provenance sidecar.

    python tools/preprocess_data.py --input a.jsonl b.jsonl --json-keys text \\
        --tokenizer-model tok.model --output-prefix data/corpus --append-eod --workers 2

writes data/corpus_text_document.{bin,idx,prov.npz}. Bad lines stop with file:line
(--on-error stop) or are counted and skipped (--on-error skip).
"""

import argparse
import os
import sys

from megallm.data.preprocess import PreprocessError, preprocess
from megallm.data.tokenizer import TokenizerError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl (one JSON object a line) or .txt files")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="one output dataset per key")
    parser.add_argument("--tokenizer-model", required=True, help="SentencePiece model (LLaMA format)")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--append-eod", action="store_true", help="end every document with the eos token")
    parser.add_argument("--prepend-bos", action="store_true", help="start every document with the bos token")
    parser.add_argument("--txt-blocks", action="store_true",
                        help=".txt inputs: a document per blank-line-separated block (default: per line)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--on-error", choices=["stop", "skip"], default="stop")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        summary = preprocess(args.input, args.tokenizer_model, args.output_prefix, json_keys=args.json_keys,
                             append_eod=args.append_eod, workers=args.workers, on_error=args.on_error,
                             txt_blocks=args.txt_blocks, prepend_bos=args.prepend_bos,
                             progress=not args.no_progress)
    except (PreprocessError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
