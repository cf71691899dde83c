"""Input shards: which files an input names, in which order, and their documents, whatever the format.

| file name | read as |
|---|---|
| `*.txt` (and any name not below) | plain text, documents separated by blank lines (data/documents.py) |
| `*.jsonl`, `*.json` | one JSON record per line, the document under the text key |
| any of these + `.gz` / `.zst` | the same, decompressed while reading (gzip; zstandard, several frames allowed) |
| `*.parquet` | the string column named by the text key, row by row |

An input is a file, a folder (every file with a name above under it, recursively, hidden ones left out, sorted by
path) or a glob pattern (`shards/*.jsonl.zst`; `**` matches folders recursively; sorted by path). A file that
cannot be read to its end (damaged or truncated compression, an unreadable parquet file, no such column) raises
`BadShard`; bad records inside a readable file follow the `on_error` policy of data/documents.py. zstandard and
pyarrow are imported only when a `.zst` or `.parquet` file is read.
"""

from __future__ import annotations

import glob
import gzip
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from data.documents import (
    JSONL_SUFFIXES,
    SKIP_HINT,
    BadInput,
    OnError,
    ReadStats,
    check_input_file,
    documents_from_lines,
)
from data.errors import DataError, MissingDataError
from data.optional import import_optional

COMPRESSIONS = (".gz", ".zst")
PARQUET = ".parquet"
# What a folder is scanned for.
SHARD_SUFFIXES = (".txt", *JSONL_SUFFIXES, PARQUET)
READ_CHUNK = 1 << 20
PARQUET_BATCH_ROWS = 1024


class BadShard(DataError):
    """A file that cannot be read to its end; the message names it and the reason."""


def shard_format(path: Path) -> tuple[str, str | None]:
    """("text" | "jsonl" | "parquet", None | ".gz" | ".zst") from the file name."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else None
    inner = suffixes[-1] if suffixes else ""
    if inner == PARQUET:
        if compression:
            raise DataError(f"{path}: a compressed parquet file; decompress it (parquet compresses inside itself)")
        return "parquet", None
    return ("jsonl" if inner in JSONL_SUFFIXES else "text"), compression


def is_shard_name(path: Path) -> bool:
    """Whether a folder's file is an input (its name is in the table above)."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes.pop()
    return bool(suffixes) and suffixes[-1] in SHARD_SUFFIXES


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files, folders and glob patterns -> the files, in order (each input's files sorted by path), every one
    checked to exist and be non-empty before any work starts."""
    files: list[Path] = []
    for item in inputs:
        text = str(item)
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and is_shard_name(p)
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise DataError(f"{path}: no .txt, .jsonl, .json (optionally .gz/.zst) or .parquet files in the folder")
        elif not path.exists() and any(c in text for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not found:
                raise MissingDataError(f"{text}: no file matches the pattern; check it (quote it for the shell)")
        else:
            found = [path]
        for p in found:
            check_input_file(p)
            shard_format(p)  # a compressed parquet file is refused here, before any work
        files += found
    if not files:
        raise DataError("--input: no input files given")
    return files


class ShardReader:
    """Iterating gives the documents of one file; `position()` is how many of its on-disk bytes are consumed."""

    def __init__(self, path: Path, text_key: str = "text", on_error: OnError = "skip") -> None:
        self.path = path
        self.text_key = text_key
        self.on_error = on_error
        self.format, self.compression = shard_format(path)
        self.size = path.stat().st_size
        self.stats = ReadStats()
        self._raw: IO[bytes] | None = None
        self._parquet_position = 0
        self._finished = False

    def position(self) -> int:
        if self._finished:
            return self.size
        if self.format == "parquet":
            return self._parquet_position
        return self._raw.tell() if self._raw is not None and not self._raw.closed else 0

    def __iter__(self) -> Iterator[str]:
        if self.format == "parquet":
            yield from self._parquet_documents()
        else:
            with self.path.open("rb") as raw:
                self._raw = raw
                lines = self._lines(raw)
                yield from documents_from_lines(
                    lines, str(self.path), self.format == "jsonl", self.text_key, self.on_error, self.stats
                )
        self._finished = True

    def _lines(self, raw: IO[bytes]) -> Iterator[bytes]:
        if self.compression is None:
            yield from raw
        elif self.compression == ".gz":
            try:
                yield from gzip.GzipFile(fileobj=raw)
            except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; truncation an EOFError
                raise BadShard(f"{self.path}: damaged gzip data ({e})") from None
        else:
            yield from _split_lines(self._zstd_chunks(raw))

    def _zstd_chunks(self, raw: IO[bytes]) -> Iterator[bytes]:
        # Not zstandard's stream_reader: it ends silently at a truncated frame. A decompressobj per frame says
        # whether the last frame was complete (`eof`).
        zstd = import_optional("zstandard", "reading .zst files")
        dctx = zstd.ZstdDecompressor()
        frame, mid_frame = dctx.decompressobj(), False
        try:
            while chunk := raw.read(READ_CHUNK):
                while chunk:
                    out = frame.decompress(chunk)
                    mid_frame = True
                    if out:
                        yield out
                    if not frame.eof:
                        break
                    chunk = frame.unused_data
                    frame, mid_frame = dctx.decompressobj(), False
        except zstd.ZstdError as e:
            raise BadShard(f"{self.path}: damaged zstandard data ({e})") from None
        if mid_frame:
            raise BadShard(f"{self.path}: the zstandard data ends in the middle of a frame (a truncated file)")

    def _parquet_documents(self) -> Iterator[str]:
        pa = import_optional("pyarrow", "reading .parquet files")
        pq = import_optional("pyarrow.parquet", "reading .parquet files")
        try:
            f = pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as e:
            raise BadShard(f"{self.path}: not a readable parquet file ({_first_line(e)})") from None
        with f:
            schema = f.schema_arrow
            if self.text_key not in schema.names:
                raise BadShard(
                    f"{self.path}: no column {self.text_key!r} (columns: {', '.join(schema.names)}); set --text-key"
                )
            kind = schema.field(self.text_key).type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
                raise BadShard(f"{self.path}: column {self.text_key!r} holds {kind}, not text; set --text-key")
            rows, total = 0, max(f.metadata.num_rows, 1)
            batches = f.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[self.text_key])
            while True:
                try:
                    batch = next(batches, None)
                except (pa.ArrowException, OSError) as e:
                    raise BadShard(f"{self.path}: damaged parquet data after row {rows} ({_first_line(e)})") from None
                if batch is None:
                    break
                try:
                    values = batch.column(0).to_pylist()
                except UnicodeDecodeError as e:
                    raise BadShard(
                        f"{self.path}: invalid UTF-8 in column {self.text_key!r} after row {rows} ({e})"
                    ) from None
                for value in values:
                    rows += 1
                    if value is None:
                        if self.on_error == "stop":
                            raise BadInput(f"{self.path}: row {rows}: {self.text_key!r} is null; {SKIP_HINT}")
                        self.stats.missing_field += 1
                    elif not value:
                        self.stats.empty_documents += 1
                    else:
                        self.stats.documents += 1
                        self.stats.text_bytes += len(value.encode("utf-8"))
                        yield value
                self._parquet_position = self.size * rows // total
        self.stats.bytes_read = self.size


def _split_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Lines ending in b"\\n" (the last one maybe not), as iterating a file gives them."""
    tail = b""
    for chunk in chunks:
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        for line in lines:
            yield line + b"\n"
    if tail:
        yield tail


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
