"""Train a tokenizer on text, JSONL or parquet shards: sentencepiece (BPE or unigram, the default) or a byte-level BPE
`tokenizer.json` (the Hugging Face tokenizers library).

    python -m tools.train_tokenizer --input a.txt 'shards/*.jsonl.zst' --model-prefix tok/bpe32k --vocab-size 32000 \
        [--kind sentencepiece|bpe] [--model-type bpe|unigram] [--text-key text] [--max-lines N]

Inputs are read as tools/preprocess_data.py reads them (files, folders, glob patterns; bad records skipped). Both
kinds are lossless (decoding gives back the exact text) and have the special tokens unk 0, bos 1, eos 2
(end-of-document), pad 3; nothing is added to a text on encoding. Files are written atomically.

- `--kind sentencepiece` writes PREFIX.model and PREFIX.vocab: identity normalization, whitespace kept as is, newline
  as its own piece, and byte fallback so any character outside the vocabulary still round-trips (this needs vocab
  >= 256 bytes + the corpus' characters + 4 specials). `--model-type` and `--max-lines` apply to this kind.
- `--kind bpe` writes PREFIX.json, a byte-level BPE `tokenizer.json` (`<unk>` `<s>` `</s>` `<pad>`), whose words are
  split with cl100k_base's pattern (data/tokenizer.py `TIKTOKEN_PATTERN`) before byte-level merges; vocab >= 260.
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

from data.errors import DataError
from data.optional import import_optional
from data.readers import ShardReader, expand_inputs
from data.tokenizer import TIKTOKEN_PATTERN, load_tokenizer
from model.errors import UserError

# sentencepiece drops training "sentences" longer than this many bytes; lines longer than it are cut into pieces.
MAX_SENTENCE_BYTES = 16384
NEWLINE = "\n"
OUTPUT_SUFFIXES = (".model", ".vocab")
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, as for sentencepiece
KINDS = ("sentencepiece", "bpe")


def training_documents(inputs: Sequence[Path], text_key: str) -> Iterator[str]:
    for path in inputs:
        yield from ShardReader(path, text_key, on_error="skip")


def training_lines(inputs: Sequence[Path], text_key: str) -> Iterator[str]:
    """Lines of all documents: sentencepiece trains on sentences, and a newline is its own piece anyway."""
    for doc in training_documents(inputs, text_key):
        for line in doc.split(NEWLINE):
            for i in range(0, len(line), MAX_SENTENCE_BYTES // 4):  # 4 bytes per character at most
                yield line[i : i + MAX_SENTENCE_BYTES // 4]


def train_tokenizer(
    inputs: Sequence[str | Path],
    model_prefix: str | Path,
    vocab_size: int,
    model_type: str = "bpe",
    text_key: str = "text",
    max_lines: int = 0,
    character_coverage: float = 1.0,
    seed: int = 0,
) -> Path:
    """A sentencepiece model; returns the path of the .model file."""
    paths = expand_inputs(inputs)
    spm = import_optional("sentencepiece", "a sentencepiece tokenizer")
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
                sentence_iterator=training_lines(paths, text_key),
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
            raise DataError(f"--vocab-size {vocab_size}: {_sentencepiece_reason(e)}") from None
        for tmp, suffix in zip(tmp_files, OUTPUT_SUFFIXES, strict=True):
            os.replace(tmp, f"{prefix}{suffix}")
    finally:
        for tmp in tmp_files:
            tmp.unlink(missing_ok=True)
    return Path(f"{prefix}.model")


def train_bpe_tokenizer(
    inputs: Sequence[str | Path], model_prefix: str | Path, vocab_size: int, text_key: str = "text"
) -> Path:
    """A byte-level BPE tokenizer.json; returns its path (PREFIX.json)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise DataError(
            f"--vocab-size {vocab_size}: a byte-level BPE needs at least {256 + len(SPECIAL_TOKENS)} (256 bytes + "
            f"{len(SPECIAL_TOKENS)} special tokens)"
        )
    paths = expand_inputs(inputs)
    tk = import_optional("tokenizers", "a byte-level BPE tokenizer")
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [
            tk.pre_tokenizers.Split(tk.Regex(TIKTOKEN_PATTERN), behavior="isolated"),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),  # every byte, so any text round-trips
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_documents(paths, text_key), trainer)
    path = Path(f"{model_prefix}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tokenizer.save(str(tmp))
        os.replace(tmp, path)  # a failed or killed run never leaves a half-written PREFIX.json
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _sentencepiece_reason(e: RuntimeError) -> str:
    """sentencepiece errors look like 'INTERNAL: src/x.cc(638) [check] Reason. Fix.'; keep 'Reason. Fix.'."""
    text = " ".join(str(e).split())
    match = re.search(r"\] (.*)$", text)
    return match.group(1) if match else text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.train_tokenizer", description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="files, folders or quoted glob patterns")
    p.add_argument(
        "--model-prefix", required=True, help="writes PREFIX.model + PREFIX.vocab (sentencepiece) or PREFIX.json (bpe)"
    )
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--kind", choices=KINDS, default="sentencepiece", help="sentencepiece model or byte-level BPE")
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="sentencepiece's algorithm")
    p.add_argument(
        "--text-key",
        "--json-key",
        "--column",
        dest="text_key",
        default="text",
        help="JSONL field / parquet column holding the document",
    )
    p.add_argument(
        "--max-lines", type=int, default=0, help="sentencepiece: train on a random sample of this many lines (0: all)"
    )
    p.add_argument("--character-coverage", type=float, default=1.0, help="e.g. 0.9995 for large CJK alphabets")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.kind == "bpe":
            if args.max_lines:
                raise DataError("--max-lines: sentencepiece only; give --kind bpe fewer input files instead")
            path = train_bpe_tokenizer(args.input, args.model_prefix, args.vocab_size, args.text_key)
        else:
            path = train_tokenizer(
                args.input,
                args.model_prefix,
                args.vocab_size,
                args.model_type,
                args.text_key,
                args.max_lines,
                args.character_coverage,
                args.seed,
            )
        vocab = load_tokenizer(path).vocab_size
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    what = "byte-level BPE" if args.kind == "bpe" else f"sentencepiece {args.model_type}"
    fewer = f" (not {args.vocab_size:,}: the corpus has no more pairs to merge)" if vocab < args.vocab_size else ""
    print(f"{path}: {what} tokenizer, vocabulary {vocab:,}{fewer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
