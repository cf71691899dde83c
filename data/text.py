"""Byte-level fallback tokenizer for plain-text and JSONL files (until a trained sentencepiece model is used).

Ids 0..255 are bytes, 256 is end-of-document. A .txt file is split into documents at blank lines; a .jsonl file
has one document per line, taken from the configured key.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

EOD_ID = 256


def read_documents(path: str | Path, jsonl_key: str = "text") -> list[str]:
    path = Path(path)
    raw = path.read_bytes().decode("utf-8", errors="replace")
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{lineno}: not valid JSON; fix or remove the line") from None
            if not isinstance(record, dict) or not isinstance(record.get(jsonl_key), str):
                raise ValueError(f"{path}:{lineno}: no string field {jsonl_key!r}; set data.jsonl_key")
            docs.append(record[jsonl_key])
    else:
        docs = [d for d in raw.split("\n\n") if d.strip()]
    if not docs:
        raise ValueError(f"{path}: no documents in the file; give a non-empty .txt or .jsonl file")
    return docs


def encode_documents(docs: list[str]) -> np.ndarray:
    """Concatenate byte ids of all documents, each followed by EOD."""
    parts = []
    for doc in docs:
        parts.append(np.frombuffer(doc.encode("utf-8"), dtype=np.uint8).astype(np.int64))
        parts.append(np.array([EOD_ID], dtype=np.int64))
    return np.concatenate(parts)
