"""Input shards -> tokenized Megatron indexed dataset, in parallel worker processes.

The main process reads the shards in order (data/readers.py: text, JSONL, gzip/zstandard, parquet) and groups each
shard's documents into batches of about `batch_bytes` of text; workers encode batches (the expensive part) and
return flat token arrays; the main process writes them in input order, so the output does not depend on the number
of workers. At most 2 batches per worker are in flight, which bounds memory for any corpus size.

Bad records (invalid UTF-8, invalid JSON, no text field) are skipped and counted per file, or stop the run
(`on_error="stop"`). A file that cannot be read to its end is skipped whole: the documents already written from it
are removed again, so the output never holds a silently truncated shard (or, with "stop", the run stops). The
writer is atomic (data/indexed.py): an error or a kill leaves no dataset under the final name.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.documents import BadInput, OnError, ReadStats
from data.errors import DataError
from data.indexed import IndexedDatasetWriter, optimal_dtype
from data.readers import BadShard, ShardReader, expand_inputs
from data.tokenizer import Tokenizer, load_tokenizer


@dataclass
class FileReport:
    path: Path
    stats: ReadStats
    tokens: int = 0
    # Why the whole file was skipped (it could not be read to its end); None when it was read.
    error: str | None = None

    def problems(self, text_key: str) -> list[str]:
        return [f"skipped the whole file: {self.error}"] if self.error else self.stats.problems(text_key)


@dataclass
class PreprocessResult:
    prefix: str
    documents: int
    tokens: int
    input_bytes: int  # on disk (compressed where the input is)
    text_bytes: int  # UTF-8 bytes of the documents written
    seconds: float
    workers: int
    tokenizer: str
    files: list[FileReport] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        """Input (on-disk) megabytes per second."""
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)

    @property
    def text_mb_per_s(self) -> float:
        return self.text_bytes / 1e6 / max(self.seconds, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def skipped_records(self) -> int:
        return sum(f.stats.skipped for f in self.files if f.error is None)

    @property
    def skipped_files(self) -> list[FileReport]:
        return [f for f in self.files if f.error is not None]

    @property
    def empty_documents(self) -> int:
        return sum(f.stats.empty_documents for f in self.files)


@dataclass
class _Batch:
    docs: list[str]
    disk_bytes: int  # on-disk bytes this batch consumed (the progress bar)


@dataclass
class _ShardStart:
    index: int


@dataclass
class _ShardEnd:
    index: int
    disk_bytes: int
    error: str | None


# Worker-process state: each worker loads the tokenizer once.
_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_path)


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


def _work(
    readers: Sequence[ShardReader], on_error: OnError, batch_bytes: int
) -> Iterator[_Batch | _ShardStart | _ShardEnd]:
    """Each shard: its start, its batches (never spanning two shards, so a shard can be dropped whole), its end."""
    for index, reader in enumerate(readers):
        yield _ShardStart(index)
        docs: list[str] = []
        batch_start = consumed = 0
        error = None
        try:
            for doc in reader:
                docs.append(doc)
                if reader.stats.text_bytes - batch_start >= batch_bytes:
                    position = reader.position()
                    yield _Batch(docs, position - consumed)
                    docs, batch_start, consumed = [], reader.stats.text_bytes, position
        except BadShard as e:
            if on_error == "stop":
                raise BadInput(f"{e}; fix or remove the file, or skip it with --on-error skip") from None
            error = str(e)
        if docs and error is None:
            yield _Batch(docs, 0)
        yield _ShardEnd(index, reader.size - consumed, error)


def preprocess(
    inputs: Sequence[str | Path],
    tokenizer_path: str | Path,
    output_prefix: str | Path,
    workers: int = 1,
    text_key: str = "text",
    on_error: OnError = "skip",
    batch_bytes: int | None = None,
    progress: bool = True,
) -> PreprocessResult:
    """Tokenize `inputs` (files, folders, glob patterns; in order) into PREFIX.bin/.idx. With workers > 1 the
    caller's main module must be import-safe (`if __name__ == "__main__":`), since workers are spawned."""
    if workers < 1:
        raise DataError(f"--workers: must be >= 1, got {workers}")
    if on_error not in ("skip", "stop"):
        raise DataError(f"--on-error: {on_error!r}; use skip or stop")
    paths = expand_inputs(inputs)  # every input is checked before any work starts
    tokenizer = load_tokenizer(tokenizer_path)
    dtype = optimal_dtype(tokenizer.vocab_size)
    readers = [ShardReader(p, text_key, on_error) for p in paths]
    reports = [FileReport(r.path, r.stats) for r in readers]
    total = sum(r.size for r in readers)
    if batch_bytes is None:
        # Enough batches to keep every worker busy on a small corpus, at most 1 MB (bounded memory) on a large one.
        batch_bytes = min(max(total // (8 * workers), 64 << 10), 1 << 20)
    t0 = time.perf_counter()
    n_tokens = 0
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not progress, leave=False)
    with IndexedDatasetWriter(output_prefix, dtype) as writer:
        try:
            mark = writer.mark()
            for item in _encoded(_work(readers, on_error, batch_bytes), tokenizer, str(tokenizer_path), dtype, workers):
                if isinstance(item, _ShardStart):
                    mark = writer.mark()
                elif isinstance(item, _ShardEnd):
                    report = reports[item.index]
                    if item.error is not None:  # drop what was written of a file that could not be read to its end
                        writer.truncate(mark)
                        n_tokens -= report.tokens
                        report.tokens, report.error = 0, item.error
                    bar.update(item.disk_bytes)
                else:
                    (flat, lengths), batch, index = item
                    writer.add_documents(flat, lengths)
                    n_tokens += len(flat)
                    reports[index].tokens += len(flat)
                    bar.update(batch.disk_bytes)
        finally:
            bar.close()
        if writer.num_documents == 0:
            raise DataError(
                f"{', '.join(map(str, paths))}: no documents to tokenize (all empty or skipped as bad records or "
                "unreadable files); check the input files and --text-key"
            )
    kept = [r for r in reports if r.error is None]
    return PreprocessResult(
        prefix=writer.prefix,
        documents=writer.num_documents,
        tokens=n_tokens,
        input_bytes=total,
        text_bytes=sum(r.stats.text_bytes for r in kept),
        seconds=time.perf_counter() - t0,
        workers=workers,
        tokenizer=tokenizer.describe(),
        files=reports,
    )


def _encoded(
    work: Iterator[_Batch | _ShardStart | _ShardEnd],
    tokenizer: Tokenizer,
    tokenizer_path: str,
    dtype: type[np.number],
    workers: int,
) -> Iterator:
    """The items of `work` in order, each batch replaced by ((flat, lengths), batch, shard index); in this process
    for one worker, else in a pool with bounded look-ahead."""
    shard = 0
    if workers == 1:
        for item in work:
            if isinstance(item, _Batch):
                yield encode_batch(tokenizer, item.docs, dtype), item, shard
            else:
                shard = item.index
                yield item
        return
    # spawn, not fork: the parent may hold threads (tqdm's monitor, torch) that a forked child would inherit broken.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_path,)) as pool:
        pending: deque = deque()
        in_flight = 0

        def first() -> tuple:
            nonlocal in_flight
            entry = pending.popleft()
            if isinstance(entry, tuple):
                in_flight -= 1
                result, batch, index = entry
                return result.get(), batch, index
            return entry

        for item in work:
            if isinstance(item, _Batch):
                pending.append((pool.apply_async(_encode_in_worker, (item.docs, dtype)), item, shard))
                in_flight += 1
            else:
                shard = item.index
                pending.append(item)
            while in_flight >= 2 * workers:
                yield first()
        while pending:
            yield first()
