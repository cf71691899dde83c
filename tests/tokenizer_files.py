"""Small tokenizers of every kind, written into a test's own folder (no tests here; nothing is downloaded)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from tests.test_data_pipeline import make_docs, write_text
from tools.train_tokenizer import train_bpe_tokenizer, train_tokenizer

# Texts every kind must round-trip: inner newlines, runs of spaces, tabs, leading and trailing whitespace, characters
# never seen in training, a control character, and special tokens written out as text.
ROUND_TRIP_TEXTS = (
    "the cat sat on the mat",
    "  two spaces\n\nand\ttab ",
    "\nleading newline, trailing newline\n",
    "中文 and 🤖 and \x00 nul, déjà vu straße",
    "special tokens as text: <s> </s> <pad> <|endoftext|>",
    "",
)

# A hand-made tiktoken vocabulary: the 256 bytes, then merged tokens (each the concatenation of two earlier ones).
TIKTOKEN_MERGED = [
    b"th",
    b"the",
    b" t",
    b" the",
    b"ca",
    b"cat",
    b" c",
    b" cat",
    b" s",
    b" sat",
    b"at",
    b"in",
    b"ing",
    b"\n\n",
    b"  ",
    "é".encode(),
    "🤖".encode()[:2],
    "🤖".encode()[:3],
    "🤖".encode(),
]


def write_tiktoken(path: Path, tokens: list[bytes] | None = None) -> Path:
    """tiktoken's file format: one `base64(token) rank` line per token."""
    tokens = [bytes([b]) for b in range(256)] + TIKTOKEN_MERGED if tokens is None else tokens
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % rank for rank, t in enumerate(tokens)))
    return path


def corpus(folder: Path) -> Path:
    return write_text(folder / "corpus.txt", make_docs(400, seed=0))


def sentencepiece_model(folder: Path) -> Path:
    # Byte fallback needs 256 byte pieces + the corpus' characters + specials; 340 leaves room for some merges.
    return train_tokenizer([corpus(folder)], folder / "sp", vocab_size=340)


def bpe_json(folder: Path) -> Path:
    return train_bpe_tokenizer([corpus(folder)], folder / "bpe", vocab_size=300)


def llama_like_folder(folder: Path) -> Path:
    """A tokenizer folder as Hugging Face models ship it: a post-processor adding BOS, special tokens named in
    tokenizer_config.json (not the usual names), a chat template."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(bpe_json(folder)))
    tok.add_special_tokens(["<|begin|>", "<|end|>"])
    begin = tok.token_to_id("<|begin|>")
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|begin|> $A", special_tokens=[("<|begin|>", begin)]
    )
    out = folder / "llama-like"
    out.mkdir()
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": {"content": "<|begin|>", "special": True},
        "eos_token": "<|end|>",
        "pad_token": None,
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def tokenizer_of_kind(kind: str, folder: Path) -> Path:
    if kind == "sentencepiece":
        return sentencepiece_model(folder)
    if kind == "huggingface":
        return bpe_json(folder)
    if kind == "huggingface-folder":
        return llama_like_folder(folder)
    pytest.importorskip("tiktoken")
    return write_tiktoken(folder / "small.tiktoken")


KINDS = ("sentencepiece", "huggingface", "huggingface-folder", "tiktoken")
