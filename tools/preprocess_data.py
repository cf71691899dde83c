"""Tokenize text/JSONL files into a Megatron-compatible indexed dataset (PREFIX.bin + PREFIX.idx).

    python -m tools.preprocess_data --input a.txt b.jsonl --tokenizer tok.model --output-prefix data/corpus \
        [--workers N] [--json-key text] [--invalid-utf8 skip|error]

Each document gets EOD (the tokenizer's eos) appended. Plain-text documents are separated by blank lines; JSONL has
one document per line under --json-key. Output is written atomically: a failed or killed run leaves no dataset
under PREFIX (a run killed with SIGKILL may leave hidden `.PREFIX.bin.tmp-PID` files next to it; delete them).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python tools/preprocess_data.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.preprocess_data", description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="text or JSONL (.jsonl/.json) files, in order")
    p.add_argument("--tokenizer", required=True, help="sentencepiece .model from tools/train_tokenizer.py")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="encoding processes")
    p.add_argument("--json-key", default="text", help="field holding the document in JSONL records")
    p.add_argument(
        "--invalid-utf8",
        choices=["skip", "error"],
        default="skip",
        help="lines that are not valid UTF-8: skip and count them (default), or stop with an error",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from data.preprocess import preprocess

    try:
        r = preprocess(
            args.input,
            args.tokenizer,
            args.output_prefix,
            workers=args.workers,
            json_key=args.json_key,
            invalid_utf8=args.invalid_utf8,
            progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    skipped = f"; skipped {r.invalid_lines} invalid UTF-8 line(s)" if r.invalid_lines else ""
    empty = f"; skipped {r.empty_documents} empty document(s)" if r.empty_documents else ""
    print(
        f"{r.prefix}.{{bin,idx}}: {r.documents:,} documents, {r.tokens:,} tokens from {r.input_bytes / 1e6:.2f} MB "
        f"in {r.seconds:.2f} s ({r.mb_per_s:.2f} MB/s, {args.workers} worker(s)){skipped}{empty}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
