"""Documents from the lines of a plain-text or JSONL stream, with one policy for bad records.

- JSONL (`.jsonl` / `.json`): one JSON object per non-blank line; the document is the string under `json_key`.
- plain text: documents are separated by blank (whitespace-only) lines. A document keeps its inner newlines; the
  newline that ends its last line belongs to the separator and is dropped.

Bad records are a line that is not valid UTF-8, a JSONL line that is not JSON, and a record without a string under
`json_key`. `on_error="stop"` raises `BadInput` naming file and line; `"skip"` skips the record and counts it in
`ReadStats`. Empty documents (a JSONL record with "") are skipped and counted either way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from data.errors import DataError, MissingDataError

OnError = Literal["skip", "stop"]
JSONL_SUFFIXES = (".jsonl", ".json")
SKIP_HINT = "or skip such records with tools/preprocess_data.py --on-error skip"


class BadInput(DataError):
    """A bad record or an unreadable file met under on_error="stop": one line naming the file."""


@dataclass
class ReadStats:
    """What one file gave: documents, and the records skipped."""

    bytes_read: int = 0  # bytes of the (decompressed) lines
    documents: int = 0
    text_bytes: int = 0  # UTF-8 bytes of the documents
    invalid_utf8: int = 0
    invalid_json: int = 0
    missing_field: int = 0
    empty_documents: int = 0

    @property
    def skipped(self) -> int:
        return self.invalid_utf8 + self.invalid_json + self.missing_field

    def problems(self, json_key: str) -> list[str]:
        counts = [
            (self.invalid_utf8, "invalid UTF-8 line(s)"),
            (self.invalid_json, "invalid JSON line(s)"),
            (self.missing_field, f"record(s) without a string {json_key!r}"),
        ]
        return [f"{n:,} {what}" for n, what in counts if n]


def check_input_file(path: str | Path) -> Path:
    """Missing, unreadable or empty inputs fail before any work starts, with one line naming the file."""
    path = Path(path)
    if not path.exists():
        raise MissingDataError(f"{path}: no such file; check the path")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file; give a .txt or .jsonl file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty; give a file with at least one document")
    return path


def iter_documents(
    path: str | Path, json_key: str = "text", on_error: OnError = "stop", stats: ReadStats | None = None
) -> Iterator[str]:
    """Documents of an uncompressed .txt or .jsonl file."""
    path = Path(path)
    with path.open("rb") as f:
        yield from documents_from_lines(f, str(path), path.suffix in JSONL_SUFFIXES, json_key, on_error, stats)


def documents_from_lines(
    lines: Iterable[bytes],
    name: str,
    is_jsonl: bool,
    json_key: str = "text",
    on_error: OnError = "stop",
    stats: ReadStats | None = None,
) -> Iterator[str]:
    """Documents of a stream of raw lines (each ending in b"\\n" but maybe the last); `name` is used in messages."""
    stats = stats if stats is not None else ReadStats()
    parts: list[str] = []  # the lines of the current plain-text document
    for lineno, raw in enumerate(lines, 1):
        stats.bytes_read += len(raw)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if on_error == "stop":
                raise BadInput(
                    f"{name}:{lineno}: invalid UTF-8 at byte {e.start} of the line; fix the file {SKIP_HINT}"
                ) from None
            stats.invalid_utf8 += 1
            continue
        if is_jsonl:
            doc = _jsonl_document(line, name, lineno, json_key, on_error, stats)
            if doc is None:
                continue
            if not doc:
                stats.empty_documents += 1
                continue
        elif line.strip():
            parts.append(line)
            continue
        elif parts:
            doc, parts = _join(parts), []
        else:
            continue
        stats.documents += 1
        stats.text_bytes += len(doc.encode("utf-8"))
        yield doc
    if parts:
        doc = _join(parts)
        stats.documents += 1
        stats.text_bytes += len(doc.encode("utf-8"))
        yield doc


def _join(lines: list[str]) -> str:
    text = "".join(lines)
    return text[:-1] if text.endswith("\n") else text


def _jsonl_document(
    line: str, name: str, lineno: int, json_key: str, on_error: OnError, stats: ReadStats
) -> str | None:
    """The record's document; None for a blank or skipped line."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        if on_error == "stop":
            raise BadInput(f"{name}:{lineno}: not valid JSON; fix or remove the line, {SKIP_HINT}") from None
        stats.invalid_json += 1
        return None
    if not isinstance(record, dict) or not isinstance(record.get(json_key), str):
        if on_error == "stop":
            raise BadInput(
                f"{name}:{lineno}: no string field {json_key!r}; set the JSON key (data.jsonl_key / --text-key), "
                f"{SKIP_HINT}"
            )
        stats.missing_field += 1
        return None
    return record[json_key]
