"""Tokenizer training, text -> .bin/.idx preprocessing, the on-disk format, atomic writes and bad input.

Every corpus here is generated in tmp_path; nothing reads ../shared.
"""

import json
import random
import struct

import numpy as np
import pytest

from data import preprocess as preprocess_module
from data.indexed import IndexedDataset, IndexedDatasetWriter, optimal_dtype
from data.preprocess import preprocess
from data.tokenizer import load_tokenizer
from tools import preprocess_data, train_tokenizer

WORDS = ["the", "cat", "sat", "on", "mat", "déjà", "vu", "straße", "naïve", "x1", "🤖", "end."]


def make_docs(n: int, seed: int) -> list[str]:
    """Documents with inner newlines, runs of spaces, tabs and leading whitespace (what a lossless tokenizer keeps)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(rng.randint(1, 4)):
            sep = rng.choice([" ", " ", "  ", "\t"])
            lines.append(rng.choice(["", " "]) + sep.join(rng.choices(WORDS, k=rng.randint(1, 12))))
        docs.append("\n".join(lines))
    return docs


def write_text(path, docs):
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    corpus = write_text(root / "corpus.txt", make_docs(400, seed=0))
    # Byte fallback needs 256 byte pieces + the corpus' characters + specials; 340 leaves room for some merges.
    return train_tokenizer.train_tokenizer([corpus], root / "bpe", vocab_size=340)


def test_tokenizer_has_the_special_pieces_and_is_lossless(tokenizer_model):
    tok = load_tokenizer(tokenizer_model)
    assert tok.vocab_size == 340
    assert (tok.bos_id, tok.eod_id, tok.pad_id) == (1, 2, 3)
    # Characters never seen in training (CJK, control) still round-trip through byte fallback.
    for text in ["  two spaces\n\nand\ttab ", "\nleading newline", "中文 and \x00 nul", ""]:
        assert tok.decode(tok.encode([text])[0]) == text


def test_text_and_jsonl_round_trip_through_bin_idx(tmp_path, tokenizer_model):
    docs_txt, docs_jsonl = make_docs(30, seed=1), make_docs(20, seed=2)
    txt = write_text(tmp_path / "a.txt", docs_txt)
    jl = tmp_path / "b.jsonl"
    jl.write_text("".join(json.dumps({"content": d}) + "\n" for d in docs_jsonl), encoding="utf-8")
    result = preprocess([txt, jl], tokenizer_model, tmp_path / "out" / "ds", text_key="content", progress=False)
    assert result.documents == 50

    ds = IndexedDataset(tmp_path / "out" / "ds")
    tok = load_tokenizer(tokenizer_model)
    assert ds.dtype == np.uint16 and len(ds) == ds.num_documents == 50
    assert ds.num_tokens == result.tokens == len(ds.tokens)
    for seq, doc in zip((ds[i] for i in range(len(ds))), docs_txt + docs_jsonl, strict=True):
        assert seq[-1] == tok.eod_id and tok.eod_id not in seq[:-1]  # EOD closes every document, once
        assert tok.decode(seq[:-1].tolist()) == doc


def test_two_workers_write_the_same_bytes_as_one(tmp_path, tokenizer_model):
    txt = write_text(tmp_path / "a.txt", make_docs(300, seed=3))
    one = preprocess([txt], tokenizer_model, tmp_path / "w1", workers=1, batch_bytes=2048, progress=False)
    two = preprocess([txt], tokenizer_model, tmp_path / "w2", workers=2, batch_bytes=2048, progress=False)
    assert one.documents == two.documents == 300
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"w1{suffix}").read_bytes() == (tmp_path / f"w2{suffix}").read_bytes()


def test_idx_bytes_follow_the_megatron_layout(tmp_path):
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    with IndexedDatasetWriter(tmp_path / "demo", np.uint16) as w:
        for d in docs:
            w.add_document(np.array(d))
    idx = (tmp_path / "demo.idx").read_bytes()
    expected = (
        b"MMIDIDX\x00\x00"
        + struct.pack("<Q", 1)  # version
        + struct.pack("<B", 8)  # dtype code of uint16
        + struct.pack("<QQ", 3, 4)  # sequences, document indices (a leading 0 + one per document)
        + np.array([3, 2, 4], dtype="<i4").tobytes()  # sequence lengths
        + np.array([0, 6, 10], dtype="<i8").tobytes()  # byte offsets in .bin
        + np.array([0, 1, 2, 3], dtype="<i8").tobytes()  # document indices
    )
    assert idx == expected
    # The first 48 bytes as megatron-core 0.16.1's IndexedDatasetBuilder wrote them for the same documents
    # (listed in docs/dependencies.md): an independent record of the layout.
    recorded = bytes.fromhex(
        "4d4d49444944580000010000000000000008030000000000000004000000000000000300000002000000040000000000"
    )
    assert idx[:48] == recorded and len(idx) == 102
    assert (tmp_path / "demo.bin").read_bytes() == np.arange(5, 14, dtype="<u2").tobytes()
    ds = IndexedDataset(tmp_path / "demo.idx")  # .idx/.bin suffixes name the same dataset
    assert [ds[i].tolist() for i in range(3)] == docs and ds.document_token_ends().tolist() == [3, 5, 9]
    assert optimal_dtype(65499) == np.uint16 and optimal_dtype(65500) == np.int32


def test_megatron_core_reads_our_files_and_we_read_its_files(tmp_path):
    mc = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    torch = pytest.importorskip("torch")
    docs = [[1, 2, 3], [70000], [4, 5, 6, 7, 8]]
    with IndexedDatasetWriter(tmp_path / "ours", np.int32) as w:
        for d in docs:
            w.add_document(np.array(d))
    theirs = mc.IndexedDataset(str(tmp_path / "ours"))
    assert [theirs[i].tolist() for i in range(3)] == docs
    assert list(theirs.document_indices) == [0, 1, 2, 3]

    builder = mc.IndexedDatasetBuilder(str(tmp_path / "mc.bin"), dtype=np.uint16)
    for d in [[5, 6, 7], [8, 9]]:
        builder.add_item(torch.tensor(d))
        builder.end_document()
    builder.finalize(str(tmp_path / "mc.idx"))
    ours = IndexedDataset(tmp_path / "mc")
    assert [ours[i].tolist() for i in range(2)] == [[5, 6, 7], [8, 9]] and ours.dtype == np.uint16

    # Megatron's sentence-split datasets have several sequences per document; document ends still come out right.
    builder = mc.IndexedDatasetBuilder(str(tmp_path / "split.bin"), dtype=np.uint16)
    for doc in [[[1, 2], [3]], [[4, 5, 6]], [[7], [8], [9, 10]]]:
        for sentence in doc:
            builder.add_item(torch.tensor(sentence))
        builder.end_document()
    builder.finalize(str(tmp_path / "split.idx"))
    split = IndexedDataset(tmp_path / "split")
    assert len(split) == 6 and split.num_documents == 3 and split.document_token_ends().tolist() == [3, 6, 10]
    assert split.is_contiguous() and split.tokens.tolist() == list(range(1, 11))
    with IndexedDatasetWriter(tmp_path / "same", np.uint16) as w:
        for d in [[5, 6, 7], [8, 9]]:
            w.add_document(np.array(d))
    for suffix in (".bin", ".idx"):  # byte for byte what megatron-core writes
        assert (tmp_path / f"same{suffix}").read_bytes() == (tmp_path / f"mc{suffix}").read_bytes()


def test_a_failure_mid_write_leaves_no_dataset_under_the_final_name(tmp_path, tokenizer_model, monkeypatch):
    txt = write_text(tmp_path / "a.txt", make_docs(200, seed=4))
    calls = {"n": 0}
    real = preprocess_module.encode_batch

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 3:  # some batches are already on disk under temporary names
            raise RuntimeError("simulated crash")
        return real(*args)

    monkeypatch.setattr(preprocess_module, "encode_batch", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        preprocess([txt], tokenizer_model, tmp_path / "out" / "ds", batch_bytes=512, progress=False)
    assert calls["n"] == 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # no final names, no temporary leftovers


def test_a_crash_between_the_renames_leaves_no_readable_stale_pair(tmp_path, monkeypatch):
    prefix = tmp_path / "ds"
    with IndexedDatasetWriter(prefix, np.uint16) as w:  # an older, complete dataset
        w.add_document(np.array([1, 2, 3]))
    import data.indexed as indexed

    real_replace = indexed.os.replace

    def crash_on_idx(src, dst):
        if str(dst).endswith(".idx"):
            raise KeyboardInterrupt  # killed after the new .bin is in place
        real_replace(src, dst)

    monkeypatch.setattr(indexed.os, "replace", crash_on_idx)
    with pytest.raises(KeyboardInterrupt), IndexedDatasetWriter(prefix, np.uint16) as w:
        w.add_document(np.array([7, 8, 9, 10]))
    # The old .idx was removed before the .bin rename, so the new .bin is never paired with the stale index.
    with pytest.raises(FileNotFoundError, match=r"ds\.idx: not found"):
        IndexedDataset(prefix)


def test_truncated_bin_is_reported(tmp_path):
    with IndexedDatasetWriter(tmp_path / "ds", np.uint16) as w:
        w.add_document(np.arange(100))
    data = (tmp_path / "ds.bin").read_bytes()
    (tmp_path / "ds.bin").write_bytes(data[:50])
    with pytest.raises(ValueError, match=r"ds\.bin: 50 bytes but .* needs 200; the dataset is incomplete"):
        IndexedDataset(tmp_path / "ds")
    (tmp_path / "ds.idx").write_bytes(b"not an index at all, definitely not")
    with pytest.raises(ValueError, match="not a Megatron indexed dataset"):
        IndexedDataset(tmp_path / "ds")


def _cli(capsys, argv):
    code = preprocess_data.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_invalid_utf8_lines_are_skipped_and_counted_or_an_error(tmp_path, tokenizer_model, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good line\nbad \xff\xfe line\n\nsecond doc\n")
    base = ["--input", str(bad), "--tokenizer", str(tokenizer_model), "--no-progress", "--workers", "1"]
    code, out, err = _cli(capsys, [*base, "--output-prefix", str(tmp_path / "skip")])
    assert code == 0 and "skipped 1 bad record(s)" in out and "bad.txt: 1 invalid UTF-8 line(s)" in err
    assert IndexedDataset(tmp_path / "skip").num_documents == 2

    code, _, err = _cli(capsys, [*base, "--output-prefix", str(tmp_path / "err"), "--on-error", "stop"])
    assert code == 2 and err.count("\n") == 1
    assert "bad.txt:2: invalid UTF-8 at byte 4 of the line" in err
    assert not (tmp_path / "err.idx").exists() and not (tmp_path / "err.bin").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "missing.txt: no such file"),
        (b"", "empty.txt: the file is empty"),
        (b"\n \n\n", "no documents to tokenize"),
    ],
)
def test_missing_and_empty_inputs_are_one_line_errors(tmp_path, tokenizer_model, capsys, content, message):
    name = "missing.txt" if content is None else "empty.txt"
    if content is not None:
        (tmp_path / name).write_bytes(content)
    argv = [
        "--input",
        str(tmp_path / name),
        "--tokenizer",
        str(tokenizer_model),
        "--output-prefix",
        str(tmp_path / "o"),
    ]
    code, _, err = _cli(capsys, [*argv, "--no-progress", "--workers", "1"])
    assert code == 2 and err.count("\n") == 1 and message in err
    assert list(tmp_path.glob("o*")) == [] and list(tmp_path.glob(".o*")) == []


def test_bad_tokenizer_inputs_are_one_line_errors(tmp_path, tokenizer_model, capsys):
    txt = write_text(tmp_path / "a.txt", make_docs(5, seed=5))
    code, _, err = _cli(capsys, ["--input", str(txt), "--tokenizer", str(txt), "--output-prefix", str(tmp_path / "o")])
    assert code == 2 and "a.txt: not a sentencepiece model" in err and err.count("\n") == 1
    code = train_tokenizer.main(["--input", str(txt), "--model-prefix", str(tmp_path / "t"), "--vocab-size", "100"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --vocab-size 100: Vocabulary size is smaller than required_chars")
    assert err.count("\n") == 1 and list(tmp_path.glob("*t.*")) == []  # no half-written tokenizer files
