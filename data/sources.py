"""One configured data path -> its token stream, split into train and validation parts by document.

A path ending in .txt/.jsonl/.json is read by the byte-level fallback (data/text.py); any other path is the prefix
of an indexed dataset (PREFIX.bin + PREFIX.idx). Either way the result is the documents' tokens back to back (EOD
after each) plus where each document ends, and the split cuts at a document boundary: the last documents are held
out, as in Megatron's contiguous document splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.errors import DataError
from data.indexed import IndexedDataset, normalize_prefix
from data.text import encode_with_boundaries, is_text_path, read_documents


@dataclass
class TokenStream:
    name: str
    tokens: np.ndarray  # 1-D; for indexed datasets a read-only memory map (no copy)
    doc_ends: np.ndarray  # int64 token offset where each document ends, increasing, last == len(tokens)


def load_stream(path: str | Path, jsonl_key: str = "text") -> TokenStream:
    if is_text_path(path):
        tokens, ends = encode_with_boundaries(read_documents(path, jsonl_key))
        return TokenStream(str(path), tokens, ends)
    ds = IndexedDataset(path)
    name = normalize_prefix(path)
    if ds.num_documents == 0 or ds.num_tokens == 0:
        raise DataError(f"{name}: the indexed dataset has no tokens; rebuild it from non-empty input")
    if not ds.is_contiguous():
        raise DataError(
            f"{name}: sequences are not stored back to back in .bin; rebuild it with tools/preprocess_data.py"
        )
    return TokenStream(name, ds.tokens[: ds.num_tokens], ds.document_token_ends())


def check_token_ids(stream: TokenStream, vocab_size: int) -> None:
    """Every token id must index the model's embedding: checked once, when the dataset is opened (one pass over
    the memory map; a wrong id would otherwise surface as an IndexError inside the embedding, mid-run)."""
    top = int(stream.tokens.max())
    if top >= vocab_size:
        raise DataError(
            f"{stream.name}: holds token id {top} >= model.vocab_size={vocab_size}; set model.vocab_size >= "
            f"{top + 1} or rebuild the dataset with the tokenizer of this model"
        )
    if stream.tokens.dtype.kind == "i" and int(stream.tokens.min()) < 0:
        raise DataError(
            f"{stream.name}: holds token id {int(stream.tokens.min())} < 0; the dataset is damaged, rebuild it"
        )


def split_by_document(stream: TokenStream, valid_fraction: float, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(train tokens, valid tokens). Each part must hold one window of seq_len + 1 tokens.

    The last ceil(valid_fraction * documents) documents (at least one) are held out, more if they are shorter than
    one window. A stream too short to split at a document boundary (e.g. a single document) holds out its tail.
    """
    window = seq_len + 1
    total = len(stream.tokens)
    if total < 2 * window:
        raise DataError(
            f"{stream.name}: {total} tokens is shorter than two sequences of {window} (one to train on, one to "
            "validate); use more data or a smaller data.seq_len"
        )
    starts = np.concatenate(([0], stream.doc_ends[:-1]))  # where each document starts = candidate cut points
    n_docs = len(stream.doc_ends)
    first_valid = n_docs - max(1, int(np.ceil(valid_fraction * n_docs)))
    # Move the cut earlier (more validation documents) until validation holds a window.
    first_valid = min(first_valid, int(np.searchsorted(starts, total - window, side="right")) - 1)
    cut = int(starts[first_valid]) if first_valid >= 0 else 0
    if cut < window:
        # No document boundary leaves a window on both sides: cut inside the stream.
        cut = total - max(window, int(total * valid_fraction))
        cut = max(cut, window)
    return stream.tokens[:cut], stream.tokens[cut:]
