"""Train a sentencepiece tokenizer (BPE or unigram) on text/JSONL files.

    python -m tools.train_tokenizer --input a.txt b.jsonl --model-prefix tok/bpe32k --vocab-size 32000 \
        [--model-type bpe|unigram] [--json-key text] [--max-lines N]

Writes PREFIX.model and PREFIX.vocab (atomically). Special pieces: unk 0, bos 1, eos 2 (end-of-document), pad 3.
The tokenizer is lossless: identity normalization, whitespace kept as is, newline as its own piece, and byte
fallback so any character outside the vocabulary still round-trips (this needs vocab >= 256 bytes + the corpus'
characters + 4 specials).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python tools/train_tokenizer.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.documents import check_input_file, iter_documents

# sentencepiece drops training "sentences" longer than this many bytes; lines longer than it are cut into pieces.
MAX_SENTENCE_BYTES = 16384
NEWLINE = "\n"
OUTPUT_SUFFIXES = (".model", ".vocab")


def training_lines(inputs: Sequence[Path], json_key: str) -> Iterator[str]:
    """Lines of all documents: sentencepiece trains on sentences, and a newline is its own piece anyway."""
    for path in inputs:
        for doc in iter_documents(path, json_key, invalid_utf8="skip"):
            for line in doc.split(NEWLINE):
                for i in range(0, len(line), MAX_SENTENCE_BYTES // 4):  # 4 bytes per character at most
                    yield line[i : i + MAX_SENTENCE_BYTES // 4]


def train_tokenizer(
    inputs: Sequence[str | Path],
    model_prefix: str | Path,
    vocab_size: int,
    model_type: str = "bpe",
    json_key: str = "text",
    max_lines: int = 0,
    character_coverage: float = 1.0,
    seed: int = 0,
) -> Path:
    """Returns the path of the .model file."""
    from data.tokenizer import _sentencepiece

    paths = [check_input_file(p) for p in inputs]
    spm = _sentencepiece()
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = prefix.with_name(f".{prefix.name}.tmp-{os.getpid()}")
    # sentencepiece writes the files itself; it writes them under temporary names, renamed only once training
    # succeeded, so a failed or killed run never leaves a half-written PREFIX.model.
    spm.set_random_generator_seed(seed)  # the line sample (--max-lines) is reproducible
    tmp_files = [Path(f"{tmp_prefix}{suffix}") for suffix in OUTPUT_SUFFIXES]
    try:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=training_lines(paths, json_key),
                model_prefix=str(tmp_prefix),
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                byte_fallback=True,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                user_defined_symbols=[NEWLINE],
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=3,
                max_sentence_length=MAX_SENTENCE_BYTES,
                input_sentence_size=max_lines,
                shuffle_input_sentence=True,
                num_threads=os.cpu_count() or 1,
                minloglevel=2,
            )
        except RuntimeError as e:
            raise ValueError(f"--vocab-size {vocab_size}: {_sentencepiece_reason(e)}") from None
        for tmp, suffix in zip(tmp_files, OUTPUT_SUFFIXES, strict=True):
            os.replace(tmp, f"{prefix}{suffix}")
    finally:
        for tmp in tmp_files:
            tmp.unlink(missing_ok=True)
    return Path(f"{prefix}.model")


def _sentencepiece_reason(e: RuntimeError) -> str:
    """sentencepiece errors look like 'INTERNAL: src/x.cc(638) [check] Reason. Fix.'; keep 'Reason. Fix.'."""
    text = " ".join(str(e).split())
    match = re.search(r"\] (.*)$", text)
    return match.group(1) if match else text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.train_tokenizer", description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="text or JSONL (.jsonl/.json) files")
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--json-key", default="text", help="field holding the document in JSONL records")
    p.add_argument("--max-lines", type=int, default=0, help="train on a random sample of this many lines (0: all)")
    p.add_argument("--character-coverage", type=float, default=1.0, help="e.g. 0.9995 for large CJK alphabets")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        path = train_tokenizer(
            args.input,
            args.model_prefix,
            args.vocab_size,
            args.model_type,
            args.json_key,
            args.max_lines,
            args.character_coverage,
            args.seed,
        )
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{path}: {args.model_type} tokenizer, vocabulary {args.vocab_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
