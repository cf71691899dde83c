"""Text/JSONL files -> tokenized Megatron indexed dataset, in parallel worker processes.

The main process reads documents (cheap) and groups them into batches of about `batch_bytes` of input; workers
encode batches (the expensive part) and return flat token arrays; the main process writes them in input order, so
the output does not depend on the number of workers. At most 2 batches per worker are in flight, which bounds
memory for any corpus size. The writer is atomic (see data/indexed.py): an error or a kill leaves no dataset under
the final name.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.documents import InvalidUTF8, ReadStats, check_input_file, iter_documents
from data.indexed import IndexedDatasetWriter, optimal_dtype
from data.tokenizer import Tokenizer


@dataclass
class PreprocessResult:
    prefix: str
    documents: int
    tokens: int
    input_bytes: int
    seconds: float
    invalid_lines: int
    empty_documents: int

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)


@dataclass
class _Batch:
    docs: list[str]
    input_bytes: int


# Worker-process state: each worker loads the tokenizer once.
_worker_tokenizer: Tokenizer | None = None


def _init_worker(model_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(model_path)


def encode_batch(tokenizer: Tokenizer, docs: list[str], dtype: type[np.number]) -> tuple[np.ndarray, np.ndarray]:
    """Documents -> (flat tokens with EOD after each document, per-document lengths)."""
    ids = tokenizer.encode(docs)
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    end = 0
    for x, n in zip(ids, lengths.tolist(), strict=True):
        flat[end : end + n - 1] = x
        flat[end + n - 1] = tokenizer.eod_id
        end += n
    return flat, lengths


def _encode_in_worker(docs: list[str], dtype: type[np.number]) -> tuple[np.ndarray, np.ndarray]:
    assert _worker_tokenizer is not None, "worker started without _init_worker"
    return encode_batch(_worker_tokenizer, docs, dtype)


def _batches(
    inputs: Sequence[Path], json_key: str, invalid_utf8: InvalidUTF8, stats: ReadStats, batch_bytes: int
) -> Iterator[_Batch]:
    docs: list[str] = []
    start = 0
    for path in inputs:
        for doc in iter_documents(path, json_key, invalid_utf8, stats):
            docs.append(doc)
            if stats.bytes_read - start >= batch_bytes:
                yield _Batch(docs, stats.bytes_read - start)
                docs, start = [], stats.bytes_read
    # The tail also carries bytes of skipped lines, so the progress bar ends at 100%.
    if docs or stats.bytes_read > start:
        yield _Batch(docs, stats.bytes_read - start)


def preprocess(
    inputs: Sequence[str | Path],
    tokenizer_path: str | Path,
    output_prefix: str | Path,
    workers: int = 1,
    json_key: str = "text",
    invalid_utf8: InvalidUTF8 = "skip",
    batch_bytes: int | None = None,
    progress: bool = True,
) -> PreprocessResult:
    """Tokenize `inputs` (in order) into PREFIX.bin/.idx. With workers > 1 the caller's main module must be
    import-safe (`if __name__ == "__main__":`), since workers are spawned."""
    if workers < 1:
        raise ValueError(f"--workers: must be >= 1, got {workers}")
    paths = [check_input_file(p) for p in inputs]  # every input is checked before any work starts
    if not paths:
        raise ValueError("--input: no input files given")
    tokenizer = Tokenizer(tokenizer_path)
    dtype = optimal_dtype(tokenizer.vocab_size)
    total = sum(p.stat().st_size for p in paths)
    if batch_bytes is None:
        # Enough batches to keep every worker busy on a small corpus, at most 1 MB (bounded memory) on a large one.
        batch_bytes = min(max(total // (8 * workers), 64 << 10), 1 << 20)
    stats = ReadStats()
    batches = _batches(paths, json_key, invalid_utf8, stats, batch_bytes)
    t0 = time.perf_counter()
    n_tokens = 0
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not progress, leave=False)
    with IndexedDatasetWriter(output_prefix, dtype) as writer:
        try:
            for (flat, lengths), size in _encoded(batches, tokenizer, str(tokenizer_path), dtype, workers):
                writer.add_documents(flat, lengths)
                n_tokens += len(flat)
                bar.update(size)
        finally:
            bar.close()
        if writer.num_documents == 0:
            raise ValueError(
                f"{', '.join(map(str, paths))}: no documents to tokenize (all lines empty or skipped as invalid "
                "UTF-8); check the input files and --json-key"
            )
    return PreprocessResult(
        prefix=writer.prefix,
        documents=writer.num_documents,
        tokens=n_tokens,
        input_bytes=total,
        seconds=time.perf_counter() - t0,
        invalid_lines=stats.invalid_lines,
        empty_documents=stats.empty_documents,
    )


def _encoded(
    batches: Iterator[_Batch], tokenizer: Tokenizer, model_path: str, dtype: type[np.number], workers: int
) -> Iterator[tuple[tuple[np.ndarray, np.ndarray], int]]:
    """Encoded batches in input order; in this process for one worker, else in a pool with bounded look-ahead."""
    if workers == 1:
        for batch in batches:
            yield encode_batch(tokenizer, batch.docs, dtype), batch.input_bytes
        return
    # spawn, not fork: the parent may hold threads (tqdm's monitor, torch) that a forked child would inherit broken.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(model_path,)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append((pool.apply_async(_encode_in_worker, (batch.docs, dtype)), batch.input_bytes))
            if len(pending) >= 2 * workers:
                result, size = pending.popleft()
                yield result.get(), size
        while pending:
            result, size = pending.popleft()
            yield result.get(), size
