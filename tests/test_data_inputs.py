"""Preprocessing inputs (data/readers.py, data/preprocess.py): every format, folders and globs give the bytes the same
documents give as .txt; worker count does not change the output; bad records and unreadable shards are reported
and skipped (or stop the run) without a partial output; an interrupted run leaves nothing under the final names.

Every corpus is generated in tmp_path; nothing reads ../shared.
"""

from __future__ import annotations

import gzip
import json
import sys

import pytest

from data import readers
from data.preprocess import preprocess
from data.readers import expand_inputs
from tests.test_data_pipeline import make_docs, write_text
from tests.tokenizer_files import bpe_json
from tools import preprocess_data

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return bpe_json(tmp_path_factory.mktemp("tok"))


def jsonl_bytes(docs, key="text"):
    return "".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()


def write_shard(path, docs, key="text"):
    """`docs` in the format the file name says."""
    name = path.name
    if name.endswith(".parquet"):
        # Several row groups, and another column next to the text.
        pq.write_table(pa.table({"id": list(range(len(docs))), key: docs}), path, row_group_size=7)
    elif name.endswith(".jsonl.zst"):
        # Two frames back to back, as concatenated shards are; with checksums, as the zstd tool writes them.
        c = zstandard.ZstdCompressor(write_checksum=True)
        half = len(docs) // 2
        path.write_bytes(c.compress(jsonl_bytes(docs[:half], key)) + c.compress(jsonl_bytes(docs[half:], key)))
    elif name.endswith(".jsonl.gz"):
        path.write_bytes(gzip.compress(jsonl_bytes(docs, key)))
    elif name.endswith(".jsonl"):
        path.write_bytes(jsonl_bytes(docs, key))
    elif name.endswith(".txt.gz"):
        path.write_bytes(gzip.compress(("\n\n".join(docs) + "\n").encode()))
    else:
        write_text(path, docs)
    return path


def dataset_bytes(prefix):
    return tuple(open(f"{prefix}{suffix}", "rb").read() for suffix in (".bin", ".idx"))


def files_in(folder):
    return sorted(p.name for p in folder.iterdir())


def reference(tmp_path, tok, docs):
    """The dataset of the same documents given as one .txt file."""
    txt = write_text(tmp_path / "reference.txt", docs)
    preprocess([txt], tok, tmp_path / "ref", progress=False)
    return dataset_bytes(tmp_path / "ref")


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "txt.gz"])
def test_each_format_gives_the_bytes_of_the_same_documents_as_txt(fmt, tmp_path, tok):
    docs = make_docs(60, seed=11)
    shard = write_shard(tmp_path / f"corpus.{fmt}", docs)
    result = preprocess([shard], tok, tmp_path / "out", batch_bytes=512, progress=False)
    assert result.documents == 60 and result.skipped_records == 0 and not result.skipped_files
    assert result.text_bytes == sum(len(d.encode()) for d in docs)
    assert dataset_bytes(tmp_path / "out") == reference(tmp_path, tok, docs)


def test_folders_and_globs_read_their_shards_in_sorted_order(tmp_path, tok):
    docs = make_docs(90, seed=12)
    folder = tmp_path / "shards"
    (folder / "sub").mkdir(parents=True)
    # Sorted by path: 00, 01, sub/02; mixed formats.
    write_shard(folder / "01.parquet", docs[30:60])
    write_shard(folder / "00.jsonl.zst", docs[:30])
    write_shard(folder / "sub" / "02.txt", docs[60:])
    (folder / "README.md").write_text("not a shard")
    (folder / ".partial.jsonl").write_text("a hidden file, e.g. a download in progress\n")
    ref = reference(tmp_path, tok, docs)

    assert [p.relative_to(folder).as_posix() for p in expand_inputs([folder])] == [
        "00.jsonl.zst",
        "01.parquet",
        "sub/02.txt",
    ]
    preprocess([folder], tok, tmp_path / "from_folder", progress=False)
    assert dataset_bytes(tmp_path / "from_folder") == ref

    globbed = tmp_path / "globbed"
    globbed.mkdir()
    for i in (2, 0, 1):
        write_shard(globbed / f"part-{i}.jsonl.gz", docs[30 * i : 30 * (i + 1)])
    preprocess([str(globbed / "part-*.jsonl.gz")], tok, tmp_path / "from_glob", progress=False)
    assert dataset_bytes(tmp_path / "from_glob") == ref


def test_input_errors_are_one_line_and_come_before_any_work(tmp_path, tok):
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "notes.md").write_text("x")
    write_shard(tmp_path / "a.parquet", ["x"])
    (tmp_path / "a.parquet.gz").write_bytes(gzip.compress((tmp_path / "a.parquet").read_bytes()))
    cases = [
        (str(tmp_path / "*.jsonl"), "*.jsonl: no file matches the pattern"),
        (tmp_path / "nothing", "nothing: no .txt, .jsonl, .json (optionally .gz/.zst) or .parquet files in the folder"),
        (tmp_path / "a.parquet.gz", "a.parquet.gz: a compressed parquet file; decompress it"),
    ]
    for item, message in cases:
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            preprocess([tmp_path / "a.parquet", item], tok, tmp_path / "out", progress=False)
        assert message in str(e.value) and "\n" not in str(e.value)
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))


def corrupt(path):
    """Make `path` unreadable past some point; its first records stay readable where the format allows."""
    data = path.read_bytes()
    if path.name.startswith("truncated"):
        path.write_bytes(data[: len(data) * 2 // 3])
    elif path.name.startswith("garbled"):
        path.write_bytes(data[:200] + bytes(b ^ 0x5A for b in data[200:400]) + data[400:])
    else:
        path.write_bytes(b"PAR1" + b"\x00" * 100)


BAD_SHARDS = {
    "truncated.jsonl.gz": "damaged gzip data",
    "truncated.jsonl.zst": "ends in the middle of a frame",
    "garbled.jsonl.zst": "damaged zstandard data",
    "garbage.parquet": "not a readable parquet file",
    "nocolumn.parquet": "no column 'text' (columns: id, body); set --text-key",
}


@pytest.mark.parametrize("bad", BAD_SHARDS)
def test_an_unreadable_shard_is_skipped_whole_and_reported_or_stops(bad, tmp_path, tok, capsys):
    docs = make_docs(300, seed=13)
    good_a = write_shard(tmp_path / "a.jsonl", docs[:50])
    shard = write_shard(tmp_path / bad, docs[50:250], key="body" if bad.startswith("nocolumn") else "text")
    if not bad.startswith("nocolumn"):
        corrupt(shard)
    good_b = write_shard(tmp_path / "b.txt", docs[250:])
    out = tmp_path / "out"
    out.mkdir()

    result = preprocess([good_a, shard, good_b], tok, out / "ds", batch_bytes=256, progress=False)
    assert [f.path.name for f in result.skipped_files] == [bad]
    assert BAD_SHARDS[bad] in result.skipped_files[0].error
    if bad.startswith("truncated"):  # batches of it were written before the damage showed, then removed again
        assert result.skipped_files[0].stats.documents > 10
    assert result.documents == 100 and result.text_bytes == sum(len(d.encode()) for d in docs[:50] + docs[250:])
    assert dataset_bytes(out / "ds") == reference(tmp_path, tok, docs[:50] + docs[250:])

    base = ["--input", str(good_a), str(shard), str(good_b), "--tokenizer", str(tok), "--no-progress"]
    assert preprocess_data.main([*base, "--output-prefix", str(out / "cli"), "--workers", "1"]) == 0
    captured = capsys.readouterr()
    assert f"warning: {shard}: skipped the whole file: {shard}: " in captured.err
    assert "100 documents" in captured.out and "skipped 1 unreadable file(s)" in captured.out

    code = preprocess_data.main([*base, "--output-prefix", str(out / "stop"), "--on-error", "stop", "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {shard}: ")
    assert "--on-error skip" in err
    assert files_in(out) == ["cli.bin", "cli.idx", "ds.bin", "ds.idx"]  # nothing of the stopped run


@pytest.mark.slow
def test_two_workers_write_the_bytes_of_one_around_a_skipped_shard(tmp_path, tok):
    docs = make_docs(400, seed=14)
    shards = [
        write_shard(tmp_path / "0.jsonl.zst", docs[:100]),
        write_shard(tmp_path / "truncated.jsonl.gz", docs[100:250]),
        write_shard(tmp_path / "2.parquet", docs[250:330]),
        write_shard(tmp_path / "3.txt", docs[330:]),
    ]
    corrupt(shards[1])
    one = preprocess(shards, tok, tmp_path / "w1", workers=1, batch_bytes=300, progress=False)
    two = preprocess(shards, tok, tmp_path / "w2", workers=2, batch_bytes=300, progress=False)
    assert one.documents == two.documents == 250 and one.tokens == two.tokens
    assert [f.path.name for f in two.skipped_files] == ["truncated.jsonl.gz"]
    assert dataset_bytes(tmp_path / "w1") == dataset_bytes(tmp_path / "w2")
    assert dataset_bytes(tmp_path / "w1") == reference(tmp_path, tok, docs[:100] + docs[250:])


def test_bad_records_are_counted_per_file_or_stop_naming_file_and_line(tmp_path, tok, capsys):
    good = ["first document", "second document", "third document"]
    jl = tmp_path / "records.jsonl"
    jl.write_bytes(
        jsonl_bytes(good[:1])
        + b'{"text": "cut off\n'  # invalid JSON
        + b'{"body": "no text field"}\n'
        + b'{"text": 42}\n'  # not a string
        + b'{"text": "bad \xff byte"}\n'  # invalid UTF-8
        + b'{"text": ""}\n'  # empty: skipped, counted apart
        + jsonl_bytes(good[1:2])
    )
    table = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": [None, good[2]]}), table)

    result = preprocess([jl, table], tok, tmp_path / "ds", progress=False)
    jl_stats, table_stats = (f.stats for f in result.files)
    assert (jl_stats.invalid_json, jl_stats.missing_field, jl_stats.invalid_utf8, jl_stats.empty_documents) == (
        1,
        2,
        1,
        1,
    )
    assert (table_stats.missing_field, result.skipped_records, result.documents) == (1, 5, 3)
    assert dataset_bytes(tmp_path / "ds") == reference(tmp_path, tok, good)

    base = ["--tokenizer", str(tok), "--no-progress", "--workers", "1", "--output-prefix", str(tmp_path / "cli")]
    assert preprocess_data.main(["--input", str(jl), str(table), *base]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"warning: {jl}: 1 invalid UTF-8 line(s), 1 invalid JSON line(s), 2 record(s) without a string 'text'",
        f"warning: {table}: 1 record(s) without a string 'text'",
    ]
    for path, where in ((jl, f"{jl}:2: not valid JSON"), (table, f"{table}: row 1: 'text' is null")):
        assert (
            preprocess_data.main(["--input", str(path), *base[:-1], str(tmp_path / "stop"), "--on-error", "stop"]) == 2
        )
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and where in err
    assert not list(tmp_path.glob("stop*")) and not list(tmp_path.glob(".stop*"))


def test_the_summary_line_and_the_column_flag(tmp_path, tok, capsys):
    table = write_shard(tmp_path / "t.parquet", make_docs(20, seed=15), key="content")
    argv = ["--input", str(table), "--tokenizer", str(tok), "--output-prefix", str(tmp_path / "ds"), "--no-progress"]
    assert preprocess_data.main([*argv, "--column", "content", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{tmp_path / 'ds'}.{{bin,idx}}: 20 documents, ")
    for part in (
        " tokens from 1 file(s), ",
        " MB of text (",
        " MB on disk) in ",
        " MB/s, ",
        " tokens/s, 1 worker(s), ",
    ):
        assert part in out
    assert "huggingface tokenizer" in out and "skipped" not in out


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_an_interrupted_run_leaves_the_previous_dataset_and_no_temporary_files(
    workers, tmp_path, tok, monkeypatch, capsys
):
    docs = make_docs(200, seed=16)
    shards = [write_shard(tmp_path / "a.jsonl", docs[:100]), write_shard(tmp_path / "b.jsonl.zst", docs[100:])]
    out = tmp_path / "out"
    preprocess(shards[:1], tok, out / "ds", progress=False)  # an earlier, complete dataset under the final name
    before = dataset_bytes(out / "ds")

    real = readers.documents_from_lines

    def interrupted(lines, name, *args):
        for i, doc in enumerate(real(lines, name, *args)):
            if name.endswith(".zst") and i == 40:  # batches of the first shard are on disk by now
                raise KeyboardInterrupt
            yield doc

    monkeypatch.setattr(readers, "documents_from_lines", interrupted)
    with pytest.raises(KeyboardInterrupt):
        preprocess(shards, tok, out / "ds", workers=workers, batch_bytes=256, progress=False)
    assert files_in(out) == ["ds.bin", "ds.idx"] and dataset_bytes(out / "ds") == before

    argv = ["--input", *map(str, shards), "--tokenizer", str(tok), "--output-prefix", str(out / "new"), "--no-progress"]
    assert preprocess_data.main([*argv, "--workers", str(workers)]) == 130
    assert capsys.readouterr().err == f"interrupted: no dataset written under {out / 'new'}\n"
    assert files_in(out) == ["ds.bin", "ds.idx"]


def test_a_missing_reader_library_is_a_one_line_error(tmp_path, tok, monkeypatch, capsys):
    shard = write_shard(tmp_path / "a.jsonl.zst", ["some text"])
    monkeypatch.setitem(sys.modules, "zstandard", None)
    argv = ["--input", str(shard), "--tokenizer", str(tok), "--output-prefix", str(tmp_path / "o"), "--workers", "1"]
    assert preprocess_data.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "zstandard is not installed; reading .zst files needs it" in err
    assert "pip install zstandard==0.25.0" in err
    assert not list(tmp_path.glob("o.*")) and not list(tmp_path.glob(".o.*"))
