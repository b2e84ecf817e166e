#!/usr/bin/env python3
"""Check preprocessed datasets before training: token ids within the vocabulary, no empty
documents, .bin/.idx consistent, tokenizer no larger than the model's vocabulary. Every finding
names the document's source file:line. Exit status 2 on any finding (as for bad arguments), 0 when clean.

    python tools/check_data.py --data-path data/corpus_text_document --vocab-size 4096 --tokenizer-model tok.model
"""

import argparse
import sys
import time

from megallm.data.blend import DataConfigError
from megallm.data.check import check_data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", nargs="+", required=True, help="prefixes, or a Megatron blend W1 P1 W2 P2")
    parser.add_argument("--vocab-size", type=int, required=True, help="the model's vocabulary size")
    parser.add_argument("--tokenizer-model", default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        findings = check_data(args.data_path, args.vocab_size, args.tokenizer_model)
    except DataConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for finding in findings:
        print(f"data error: {finding}")
    print(f"{len(findings)} finding{'s' if len(findings) != 1 else ''} in {time.perf_counter() - start:.2f} s")
    return 2 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
