"""Preprocessing throughput per input format and tokenizer kind (used by bench/data_pipeline.py).

The same documents are written as .txt, .jsonl, .jsonl.gz, .jsonl.zst and .parquet shards (one shard per source
file), and three tokenizers of the same vocabulary size are built: a sentencepiece BPE, a byte-level BPE
tokenizer.json, and a .tiktoken file holding that BPE's ranks. Each (format, tokenizer, workers) cell is the median
of `repeats` runs of data.preprocess.preprocess, wall time including the start of the worker processes.
Only light modules are imported here: spawned workers re-import the benchmark's main module.
"""

from __future__ import annotations

import base64
import gzip
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from data.preprocess import preprocess
from data.readers import ShardReader
from tools.train_tokenizer import train_bpe_tokenizer, train_tokenizer

FORMATS = ("txt", "jsonl", "jsonl.gz", "jsonl.zst", "parquet")
KINDS = ("sentencepiece", "huggingface", "tiktoken")


@dataclass
class Cell:
    format: str
    tokenizer: str
    workers: int
    text_mb_per_s: float
    disk_mb_per_s: float
    tokens_per_s: float
    seconds: float
    documents: int
    tokens: int
    text_bytes: int
    disk_bytes: int


def write_formats(sources: list[Path], out: Path) -> dict[str, list[Path]]:
    """format -> shards holding the documents of `sources` (blank-line separated text), in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    shards: dict[str, list[Path]] = {f: [] for f in FORMATS}
    for i, source in enumerate(sources):
        docs = list(ShardReader(source, on_error="stop"))
        base = out / f"{i:02d}-{source.stem}"
        txt = Path(f"{base}.txt")
        txt.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
        jsonl = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode()
        Path(f"{base}.jsonl").write_bytes(jsonl)
        Path(f"{base}.jsonl.gz").write_bytes(gzip.compress(jsonl, compresslevel=6))
        Path(f"{base}.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3, write_checksum=True).compress(jsonl))
        pq.write_table(pa.table({"text": docs}), f"{base}.parquet")
        for fmt in FORMATS:
            shards[fmt].append(Path(f"{base}.{fmt}"))
    return shards


def byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character -> the byte it stands for (printable Latin-1 bytes stand for
    themselves, the other 68 bytes are mapped to 256, 257, ... in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    stand_in, extra = {}, 0
    for b in range(256):
        if b in printable:
            stand_in[chr(b)] = b
        else:
            stand_in[chr(256 + extra)] = b
            extra += 1
    return stand_in


def tiktoken_from_bpe(tokenizer_json: Path, out: Path) -> Path:
    """The BPE's ordinary tokens, in id order, as tiktoken ranks (special tokens left out)."""
    data = json.loads(tokenizer_json.read_text())
    special = {t["content"] for t in data["added_tokens"]}
    to_byte = byte_level_alphabet()
    vocab = sorted((i, t) for t, i in data["model"]["vocab"].items() if t not in special)
    lines = [base64.b64encode(bytes(to_byte[c] for c in t)) + b" %d\n" % rank for rank, (_, t) in enumerate(vocab)]
    out.write_bytes(b"".join(lines))
    return out


def build_tokenizers(sources: list[Path], out: Path, vocab_size: int) -> dict[str, Path]:
    bpe = train_bpe_tokenizer(sources, out / "bpe", vocab_size)
    return {
        "sentencepiece": train_tokenizer(sources, out / "sp", vocab_size),
        "huggingface": bpe,
        "tiktoken": tiktoken_from_bpe(bpe, out / "bpe.tiktoken"),
    }


def run_cells(
    shards: dict[str, list[Path]], tokenizers: dict[str, Path], out: Path, workers: tuple[int, ...], repeats: int
) -> list[Cell]:
    cells = []
    for fmt, inputs in shards.items():
        for kind, tok in tokenizers.items():
            for w in workers:
                runs = [
                    preprocess(inputs, tok, out / f"{fmt}-{kind}-{w}", workers=w, progress=False)
                    for _ in range(repeats)
                ]
                r = sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]  # the median run
                cells.append(
                    Cell(
                        fmt,
                        kind,
                        w,
                        r.text_mb_per_s,
                        r.mb_per_s,
                        r.tokens_per_s,
                        r.seconds,
                        r.documents,
                        r.tokens,
                        r.text_bytes,
                        r.input_bytes,
                    )
                )
    return cells


def check_identical(out: Path, cells: list[Cell]) -> list[str]:
    """Per tokenizer: do all formats and worker counts write the same bytes? Returns the cells that differ."""
    differ = []
    for kind in KINDS:
        ref = None
        for c in cells:
            if c.tokenizer != kind:
                continue
            prefix = out / f"{c.format}-{c.tokenizer}-{c.workers}"
            data = (Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes())
            ref = ref or data
            if data != ref:
                differ.append(prefix.name)
    return differ


def table_rows(cells: list[Cell], workers: tuple[int, ...]) -> tuple[list[str], list[list[str]]]:
    """Rows: formats; columns: tokenizer x workers; each cell 'text MB/s / thousand tokens/s'."""
    headers = ["format (MB on disk)"] + [f"{k}, {w} worker(s)" for k in KINDS for w in workers]
    by_key = {(c.format, c.tokenizer, c.workers): c for c in cells}
    rows = []
    for fmt in FORMATS:
        disk = by_key[(fmt, KINDS[0], workers[0])].disk_bytes / 1e6
        row = [f"{fmt} ({disk:.2f})"]
        for k in KINDS:
            for w in workers:
                c = by_key[(fmt, k, w)]
                row.append(f"{c.text_mb_per_s:.2f} / {c.tokens_per_s / 1e3:.0f}k")
        rows.append(row)
    return headers, rows


def cells_json(cells: list[Cell]) -> list[dict]:
    return [asdict(c) for c in cells]
