"""Tokenize text, JSONL or parquet shards into a Megatron-compatible indexed dataset (PREFIX.bin + PREFIX.idx).

    python -m tools.preprocess_data --input 'shards/*.jsonl.zst' more/ c.parquet --tokenizer TOKENIZER \
        --output-prefix data/corpus [--workers N] [--text-key text] [--on-error skip|stop] [--no-progress]

Inputs are files, folders (every .txt/.jsonl/.json[.gz|.zst]/.parquet file under them) and glob patterns (quoted),
read in order. Each document gets EOD (the tokenizer's eos) appended. Plain-text documents are separated by blank
lines; JSONL has one document per line under --text-key; parquet has one per row in the column --text-key.
TOKENIZER is a sentencepiece .model, a tokenizer.json or a folder holding one, or a .tiktoken file.

Bad records (invalid UTF-8, invalid JSON, no text field) and files that cannot be read to their end (damaged or
truncated compression, unreadable parquet) are skipped and reported per file (`--on-error skip`, the default; a
skipped file contributes nothing), or stop the run with one line and exit code 2 (`--on-error stop`). Output is
written atomically: a failed or interrupted run leaves no dataset under PREFIX (a run killed with SIGKILL may leave
hidden `.PREFIX.bin.tmp-PID` files next to it; delete them).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from model.errors import UserError

if __package__ in (None, ""):  # run as a file (python tools/preprocess_data.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.preprocess_data", description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="files, folders or quoted glob patterns, in order")
    p.add_argument(
        "--tokenizer", required=True, help="sentencepiece .model, tokenizer.json (or its folder), or .tiktoken file"
    )
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="encoding processes")
    p.add_argument(
        "--text-key",
        "--json-key",
        "--column",
        dest="text_key",
        default="text",
        help="JSONL field / parquet column holding the document (default: text)",
    )
    p.add_argument(
        "--on-error",
        choices=["skip", "stop"],
        default="skip",
        help="bad records and unreadable files: skip and report them (default), or stop with an error",
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
            text_key=args.text_key,
            on_error=args.on_error,
            progress=not args.no_progress,
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: no dataset written under {args.output_prefix}", file=sys.stderr)
        return 130
    for f in r.files:
        problems = f.problems(args.text_key)
        if problems:
            print(f"warning: {f.path}: {', '.join(problems)}", file=sys.stderr)
    skipped = [f"{r.skipped_records:,} bad record(s)"] if r.skipped_records else []
    skipped += [f"{len(r.skipped_files)} unreadable file(s)"] if r.skipped_files else []
    skipped += [f"{r.empty_documents:,} empty document(s)"] if r.empty_documents else []
    print(
        f"{r.prefix}.{{bin,idx}}: {r.documents:,} documents, {r.tokens:,} tokens from {len(r.files)} file(s), "
        f"{r.text_bytes / 1e6:.2f} MB of text ({r.input_bytes / 1e6:.2f} MB on disk) in {r.seconds:.2f} s: "
        f"{r.text_mb_per_s:.2f} MB/s, {r.tokens_per_s:,.0f} tokens/s, {r.workers} worker(s), {r.tokenizer}"
        + (f"; skipped {', '.join(skipped)}" if skipped else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
