"""Byte-level fallback tokenizer for a plain-text or JSONL `data.path` (no tokenizer model, no preprocessing).

Ids 0..255 are bytes, 256 is end-of-document. Documents are read by `data.documents` (blank-line separated text,
or one JSONL record per line); invalid UTF-8 is an error here, since there is no place to report skipped lines.
For real corpora, train a tokenizer and build an indexed dataset with tools/ instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data.documents import check_input_file, iter_documents
from data.errors import DataError

EOD_ID = 256
VOCAB_SIZE = 257


def is_text_path(path: str | Path) -> bool:
    """Paths the byte-level fallback reads; every other data path names an indexed dataset."""
    return str(path).endswith((".txt", ".jsonl", ".json"))


def read_documents(path: str | Path, jsonl_key: str = "text") -> list[str]:
    path = check_input_file(path)
    docs = list(iter_documents(path, jsonl_key, on_error="stop"))
    if not docs:
        raise DataError(f"{path}: no documents in the file; give a non-empty .txt or .jsonl file")
    return docs


def encode_documents(docs: list[str]) -> np.ndarray:
    """Concatenate byte ids of all documents, each followed by EOD."""
    return encode_with_boundaries(docs)[0]


def encode_with_boundaries(docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, document end offsets): byte ids of all documents back to back, each followed by EOD."""
    parts = []
    for doc in docs:
        parts.append(np.frombuffer(doc.encode("utf-8"), dtype=np.uint8).astype(np.int64))
        parts.append(np.array([EOD_ID], dtype=np.int64))
    ends = np.cumsum([len(doc.encode("utf-8")) + 1 for doc in docs], dtype=np.int64)
    return np.concatenate(parts), ends
