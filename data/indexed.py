"""Megatron-compatible indexed datasets: `PREFIX.bin` (token ids) + `PREFIX.idx` (where each sequence lies).

The byte layout is the one megatron-core's `megatron.core.datasets.indexed_dataset` reads and writes, so datasets
move between the two projects unchanged. `.idx`, all little-endian:

    magic        9 bytes   b"MMIDIDX\\x00\\x00"
    version      uint64    1
    dtype code   uint8     see DTYPE_CODES (uint16 for vocabularies < 65500, else int32)
    sequences    uint64    S
    doc indices  uint64    D + 1 (a leading 0, then the sequence index where each document ends)
    lengths      int32[S]  tokens per sequence
    pointers     int64[S]  byte offset of each sequence in .bin
    doc indices  int64[D + 1]

`.bin` is the sequences' token ids back to back. Our writer puts one sequence (the document's tokens plus EOD) per
document. Writes are atomic: both files are written under temporary names and renamed at the end, `.idx` last,
because the reader treats `.idx` as the marker of a complete dataset.
"""

from __future__ import annotations

import os
import struct
from array import array
from pathlib import Path
from types import TracebackType

import numpy as np

from data.errors import DataError, MissingDataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# Megatron's DType enum: the code stored in the header for each element type.
DTYPE_CODES: dict[type[np.number], int] = {
    np.uint8: 1,
    np.int8: 2,
    np.int16: 3,
    np.int32: 4,
    np.int64: 5,
    np.float64: 6,
    np.float32: 7,
    np.uint16: 8,
}
_CODE_TO_DTYPE = {code: dtype for dtype, code in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")


def optimal_dtype(vocab_size: int) -> type[np.number]:
    """The element type Megatron's preprocessing picks for a vocabulary (same threshold, so files match)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def normalize_prefix(path: str | Path) -> str:
    """`data/x`, `data/x.bin` and `data/x.idx` all name the dataset `data/x`."""
    text = str(path)
    return text[:-4] if text.endswith((".bin", ".idx")) else text


class IndexedDatasetWriter:
    """Streams documents into temporary files; `finalize()` renames them into place, `abort()` removes them.

    Use as a context manager: leaving the block with an exception aborts, so no final-named file is ever partial.
    """

    def __init__(self, prefix: str | Path, dtype: type[np.number]) -> None:
        if dtype not in DTYPE_CODES:
            raise ValueError(f"dtype {dtype} cannot be stored in an indexed dataset; use one of {list(DTYPE_CODES)}")
        self.prefix = normalize_prefix(prefix)
        self.dtype = np.dtype(dtype)
        self._code = DTYPE_CODES[dtype]
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        # Hidden temporary names next to the final ones (same file system, so os.replace is atomic).
        final_bin, final_idx = bin_path(self.prefix), idx_path(self.prefix)
        tag = f".tmp-{os.getpid()}"
        self._tmp_bin = final_bin.with_name(f".{final_bin.name}{tag}")
        self._tmp_idx = final_idx.with_name(f".{final_idx.name}{tag}")
        self._bin = self._tmp_bin.open("wb")
        self._lengths = array("i")  # int32, as in the file
        self._closed = False

    @property
    def num_documents(self) -> int:
        return len(self._lengths)

    def add_document(self, tokens: np.ndarray) -> None:
        """One document = one sequence (its tokens, EOD included by the caller)."""
        self.add_documents(np.asarray(tokens), np.array([len(tokens)], dtype=np.int64))

    def add_documents(self, flat_tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Several documents at once: their tokens back to back and the length of each."""
        if int(np.sum(lengths)) != len(flat_tokens):
            raise ValueError(f"lengths sum to {int(np.sum(lengths))} but {len(flat_tokens)} tokens were given")
        self._bin.write(np.ascontiguousarray(flat_tokens, dtype=self.dtype).tobytes())
        self._lengths.frombytes(np.asarray(lengths, dtype=np.int32).tobytes())

    def mark(self) -> tuple[int, int]:
        """Where the next document goes; `truncate(mark)` drops every document added after this point."""
        return self._bin.tell(), len(self._lengths)

    def truncate(self, mark: tuple[int, int]) -> None:
        offset, documents = mark
        self._bin.truncate(offset)  # flushes the buffer first
        self._bin.seek(offset)
        del self._lengths[documents:]

    def finalize(self) -> None:
        lengths = np.frombuffer(self._lengths, dtype=np.int32) if self._lengths else np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_indices = np.arange(len(lengths) + 1, dtype=np.int64)
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        with self._tmp_idx.open("wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, self._code, len(lengths), len(doc_indices)))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(doc_indices.tobytes())
            f.flush()
            os.fsync(f.fileno())
        final_bin, final_idx = bin_path(self.prefix), idx_path(self.prefix)
        # Drop an older dataset's .idx first: if we die between the two renames, what is left has no .idx and
        # reads as "not a dataset" instead of a new .bin paired with a stale index.
        final_idx.unlink(missing_ok=True)
        os.replace(self._tmp_bin, final_bin)
        os.replace(self._tmp_idx, final_idx)
        self._closed = True

    def abort(self) -> None:
        if self._closed:
            return
        self._bin.close()
        self._tmp_bin.unlink(missing_ok=True)
        self._tmp_idx.unlink(missing_ok=True)
        self._closed = True

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.finalize()


class IndexedDataset:
    """Memory-mapped reader. `dataset[i]` is sequence i (a read-only view into `.bin`, no copy)."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = normalize_prefix(prefix)
        ipath, bpath = idx_path(self.prefix), bin_path(self.prefix)
        for p in (ipath, bpath):
            if not p.is_file():
                raise MissingDataError(
                    f"{p}: not found; build the dataset with tools/preprocess_data.py --output-prefix {self.prefix}"
                )
        size = ipath.stat().st_size
        if size < _HEADER.size:
            raise DataError(f"{ipath}: {size} bytes is too short for an index header; rebuild the dataset")
        raw = np.memmap(ipath, dtype=np.uint8, mode="r")
        magic, version, code, n_seq, n_doc_idx = _HEADER.unpack(bytes(raw[: _HEADER.size]))
        if magic != MAGIC:
            raise DataError(f"{ipath}: not a Megatron indexed dataset (bad magic {magic!r}); rebuild the dataset")
        if version != VERSION:
            raise DataError(f"{ipath}: index version {version} is not supported (only {VERSION})")
        if code not in _CODE_TO_DTYPE:
            raise DataError(f"{ipath}: unknown dtype code {code}; rebuild the dataset")
        self.dtype = np.dtype(_CODE_TO_DTYPE[code])
        expected = _HEADER.size + n_seq * (4 + 8) + n_doc_idx * 8
        if len(raw) != expected:
            raise DataError(
                f"{ipath}: {len(raw)} bytes but the header describes {expected}; the index is damaged or from a "
                "multimodal dataset, rebuild it"
            )
        offset = _HEADER.size
        self.sequence_lengths = np.frombuffer(raw, dtype=np.int32, count=n_seq, offset=offset)
        offset += n_seq * 4
        self.sequence_pointers = np.frombuffer(raw, dtype=np.int64, count=n_seq, offset=offset)
        offset += n_seq * 8
        self.document_indices = np.frombuffer(raw, dtype=np.int64, count=n_doc_idx, offset=offset)
        bin_bytes = bpath.stat().st_size
        end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize if n_seq else 0
        if end > bin_bytes or bin_bytes % self.dtype.itemsize:
            raise DataError(
                f"{bpath}: {bin_bytes} bytes but {ipath} needs {end}; the dataset is incomplete, rebuild it"
            )
        # An empty .bin cannot be memory-mapped; an empty array stands in for it.
        self.tokens = np.memmap(bpath, dtype=self.dtype, mode="r") if bin_bytes else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sequence_lengths[i])]

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def is_contiguous(self) -> bool:
        """True when the sequences lie back to back in order (ours and Megatron's builder always write so)."""
        lengths = self.sequence_lengths.astype(np.int64) * self.dtype.itemsize
        expected = np.concatenate(([0], np.cumsum(lengths[:-1]))) if len(lengths) else lengths
        return bool(np.array_equal(self.sequence_pointers, expected))

    def document_token_ends(self) -> np.ndarray:
        """Token offset where each document ends in the back-to-back stream (for contiguous datasets)."""
        seq_ends = np.concatenate(([0], np.cumsum(self.sequence_lengths, dtype=np.int64)))
        return seq_ends[self.document_indices[1:]]
