"""Documents from plain-text and JSONL files, read line by line (any file size), with a policy for bad UTF-8.

- `.jsonl` / `.json`: one JSON object per non-blank line; the document is the string under `json_key`.
- anything else: plain text; documents are separated by blank (whitespace-only) lines. A document keeps its inner
  newlines; the newline that ends its last line belongs to the separator and is dropped.

A line that is not valid UTF-8 is either an error naming file and line (`invalid_utf8="error"`) or skipped and
counted in `ReadStats.invalid_lines` (`"skip"`). Empty documents (a JSONL record with "") are skipped and counted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

InvalidUTF8 = Literal["skip", "error"]
JSONL_SUFFIXES = (".jsonl", ".json")


@dataclass
class ReadStats:
    bytes_read: int = 0
    documents: int = 0
    invalid_lines: int = 0
    empty_documents: int = 0


def check_input_file(path: str | Path) -> Path:
    """Missing, unreadable or empty inputs fail before any work starts, with one line naming the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file; check the path")
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file; give a .txt or .jsonl file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty; give a file with at least one document")
    return path


def iter_documents(
    path: str | Path,
    json_key: str = "text",
    invalid_utf8: InvalidUTF8 = "error",
    stats: ReadStats | None = None,
) -> Iterator[str]:
    path = Path(path)
    stats = stats if stats is not None else ReadStats()
    is_jsonl = path.suffix in JSONL_SUFFIXES
    lines: list[str] = []  # current plain-text document
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            stats.bytes_read += len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if invalid_utf8 == "error":
                    raise ValueError(
                        f"{path}:{lineno}: invalid UTF-8 at byte {e.start} of the line; fix the file or skip such "
                        "lines (tools/preprocess_data.py --invalid-utf8 skip)"
                    ) from None
                stats.invalid_lines += 1
                continue
            if is_jsonl:
                doc = _jsonl_document(line, path, lineno, json_key)
                if doc is None:
                    continue
                if not doc:
                    stats.empty_documents += 1
                    continue
                stats.documents += 1
                yield doc
            elif line.strip():
                lines.append(line)
            elif lines:
                stats.documents += 1
                yield _join(lines)
                lines = []
    if lines:
        stats.documents += 1
        yield _join(lines)


def _join(lines: list[str]) -> str:
    text = "".join(lines)
    return text[:-1] if text.endswith("\n") else text


def _jsonl_document(line: str, path: Path, lineno: int, json_key: str) -> str | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise ValueError(f"{path}:{lineno}: not valid JSON; fix or remove the line") from None
    if not isinstance(record, dict) or not isinstance(record.get(json_key), str):
        raise ValueError(
            f"{path}:{lineno}: no string field {json_key!r}; set the JSON key (data.jsonl_key / --json-key)"
        )
    return record[json_key]
