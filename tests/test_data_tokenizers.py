"""Tokenizer kinds (data/tokenizer.py): each round-trips text, gives its library's ids, names its special tokens,
works in preprocessing and in the config's vocabulary check; bad tokenizer files are one-line errors; the byte-level
BPE trainer. Every tokenizer is built in tmp_path (tests/tokenizer_files.py); nothing is downloaded."""

from __future__ import annotations

import json
import sys

import pytest

from data.indexed import IndexedDataset
from data.preprocess import preprocess
from data.tokenizer import TIKTOKEN_PATTERN, load_tokenizer
from model.config import ConfigError
from tests.test_data_pipeline import make_docs, write_text
from tests.tokenizer_files import KINDS, ROUND_TRIP_TEXTS, TIKTOKEN_MERGED, tokenizer_of_kind, write_tiktoken
from tools import train_tokenizer
from train.config_load import load_config


@pytest.fixture(scope="module")
def tokenizer_paths(tmp_path_factory):
    paths = {}
    for kind in KINDS:
        folder = tmp_path_factory.mktemp(kind)
        paths[kind] = tokenizer_of_kind(kind, folder)
    return paths


def library_ids(kind: str, path, text: str) -> list[int]:
    """The ids the underlying library gives, called directly."""
    if kind == "sentencepiece":
        import sentencepiece

        return sentencepiece.SentencePieceProcessor(model_file=str(path)).encode(text)
    if kind.startswith("huggingface"):
        import tokenizers

        file = path / "tokenizer.json" if path.is_dir() else path
        tok = tokenizers.Tokenizer.from_file(str(file))
        tok.encode_special_tokens = True
        return tok.encode(text).ids
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(path))
    enc = tiktoken.Encoding("t", pat_str=TIKTOKEN_PATTERN, mergeable_ranks=ranks, special_tokens={})
    return enc.encode_ordinary(text)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_round_trips_and_gives_its_librarys_ids(kind, tokenizer_paths):
    path = tokenizer_paths[kind]
    tok = load_tokenizer(path)
    assert tok.kind == kind.split("-")[0]
    for text in ROUND_TRIP_TEXTS:
        ids = tok.encode([text])[0]
        assert ids == library_ids(kind, path, text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.eod_id not in ids  # "</s>" / "<|endoftext|>" written in a text never becomes EOD
    # Batches encode as the texts one by one.
    assert tok.encode(list(ROUND_TRIP_TEXTS)) == [tok.encode([t])[0] for t in ROUND_TRIP_TEXTS]


def test_special_tokens_of_each_kind(tokenizer_paths):
    sp, bpe = load_tokenizer(tokenizer_paths["sentencepiece"]), load_tokenizer(tokenizer_paths["huggingface"])
    # sentencepiece and the BPE of tools/train_tokenizer.py share the conventions unk 0, bos 1, eos 2, pad 3.
    for tok, n in ((sp, 340), (bpe, 300)):
        assert (tok.bos_id, tok.eos_id, tok.eod_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 3, n)
        assert tok.encode(["the cat"])[0][0] not in (1, 2)  # nothing added

    folder = load_tokenizer(tokenizer_paths["huggingface-folder"])  # from its tokenizer_config.json
    assert folder.special_tokens == {"bos": "<|begin|>", "eos": "<|end|>"}
    assert (folder.bos_id, folder.eos_id, folder.pad_id, folder.vocab_size) == (300, 301, None, 302)
    ids = folder.encode(["the cat"])[0]
    assert ids[0] == folder.bos_id and ids[1:] == bpe.encode(["the cat"])[0]  # its post-processor adds BOS

    tik = load_tokenizer(tokenizer_paths["tiktoken"])
    n = 256 + len(TIKTOKEN_MERGED)
    assert (tik.bos_id, tik.eos_id, tik.pad_id, tik.vocab_size) == (None, n, None, n + 1)
    rank = {t: 256 + i for i, t in enumerate(TIKTOKEN_MERGED)}
    # cl100k_base's pattern splits "the cat sat" into "the", " cat", " sat"; each is one merged token.
    assert tik.encode(["the cat sat"])[0] == [rank[b"the"], rank[b" cat"], rank[b" sat"]]
    assert tik.encode(["🤖é"])[0] == [rank["🤖".encode()], rank["é".encode()]]


def test_a_post_processor_that_appends_eos_gives_one_eod(tmp_path, tokenizer_paths):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(tokenizer_paths["huggingface"]))
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    tok.save(str(tmp_path / "eos.json"))
    docs = ["the cat", "sat on the mat"]
    txt = write_text(tmp_path / "a.txt", docs)
    preprocess([txt], tmp_path / "eos.json", tmp_path / "ds", progress=False)
    ds = IndexedDataset(tmp_path / "ds")
    plain = load_tokenizer(tokenizer_paths["huggingface"])
    assert [ds[i].tolist() for i in range(2)] == [[*plain.encode([d])[0], 2] for d in docs]


@pytest.mark.parametrize("kind", KINDS)
def test_preprocessing_writes_each_kinds_ids_and_one_eod_per_document(kind, tmp_path, tokenizer_paths):
    docs = make_docs(40, seed=7)
    txt = write_text(tmp_path / "a.txt", docs)
    result = preprocess([txt], tokenizer_paths[kind], tmp_path / "ds", batch_bytes=256, progress=False)
    tok = load_tokenizer(tokenizer_paths[kind])
    ds = IndexedDataset(tmp_path / "ds")
    assert result.documents == len(ds) == 40 and result.tokens == ds.num_tokens
    assert result.tokenizer.startswith(f"{tok.kind} tokenizer")
    for i, doc in enumerate(docs):
        assert ds[i].tolist() == [*tok.encode([doc])[0], tok.eod_id]
        assert tok.decode(ds[i][:-1].tolist()) == doc


@pytest.mark.parametrize("kind", KINDS)
def test_the_config_checks_each_kinds_vocabulary(kind, tmp_path, tokenizer_paths):
    path = tokenizer_paths[kind]
    n = load_tokenizer(path).vocab_size
    txt = write_text(tmp_path / "a.txt", ["some text"])
    base = [f"data.path={txt}", f"data.tokenizer={path}", f"train.run_dir={tmp_path}"]
    assert load_config(None, [*base, f"model.vocab_size={n}"]).data.tokenizer == str(path)
    with pytest.raises(ConfigError, match=rf"^data\.tokenizer: vocabulary of {n} tokens > model\.vocab_size={n - 1}; "):
        load_config(None, [*base, f"model.vocab_size={n - 1}"])


def test_bad_tokenizer_files_are_one_line_errors(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "bad.json").write_text("{not json")
    write_tiktoken(tmp_path / "gap.tiktoken", [bytes([b]) for b in range(256)] + [b"th"])
    (tmp_path / "gap.tiktoken").write_bytes((tmp_path / "gap.tiktoken").read_bytes().replace(b" 256\n", b" 300\n"))
    write_tiktoken(tmp_path / "few.tiktoken", [b"a", b"b"])
    (tmp_path / "garbage.tiktoken").write_text("this is not base64 and rank\n")
    cases = {
        "empty_dir": "empty_dir: a folder without tokenizer.json",
        "bad.json": "bad.json: not a Hugging Face tokenizer.json",
        "gap.tiktoken": "gap.tiktoken: ranks must be 0..256, each once",
        "few.tiktoken": "few.tiktoken: 254 of the 256 single bytes have no rank",
        "garbage.tiktoken": "garbage.tiktoken: not a tiktoken BPE file",
        "missing.model": "missing.model: tokenizer not found",
    }
    for name, message in cases.items():
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            load_tokenizer(tmp_path / name)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_tokenizer_json_without_an_eos_token_says_how_to_name_one(tmp_path, tokenizer_paths):
    data = json.loads(tokenizer_paths["huggingface"].read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "</s>"]
    (tmp_path / "noeos.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="noeos.json: no end-of-document token .*tokenizer_config.json with eos_token"):
        load_tokenizer(tmp_path / "noeos.json")


def test_a_missing_library_is_a_one_line_error_naming_the_pip_command(tmp_path, monkeypatch):
    path = write_tiktoken(tmp_path / "t.tiktoken")
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import tiktoken now raises ImportError
    with pytest.raises(ImportError, match=r"^tiktoken is not installed; .*pip install tiktoken==0\.14\.0"):
        load_tokenizer(path)


def test_train_tokenizer_writes_a_lossless_byte_level_bpe(tmp_path, capsys):
    corpus = write_text(tmp_path / "c.txt", make_docs(300, seed=9))
    argv = ["--input", str(corpus), "--model-prefix", str(tmp_path / "tok" / "bpe"), "--vocab-size", "320"]
    assert train_tokenizer.main([*argv, "--kind", "bpe"]) == 0
    # 12 distinct words leave no pairs to merge before 320.
    assert (
        "tok/bpe.json: byte-level BPE tokenizer, vocabulary 316 (not 320: the corpus has no more pairs to merge)"
        in (capsys.readouterr().out)
    )
    tok = load_tokenizer(tmp_path / "tok" / "bpe.json")
    assert tok.kind == "huggingface" and (tok.bos_id, tok.eod_id, tok.pad_id) == (1, 2, 3)
    # Merges were learned (common words are one token), and text never seen in training still round-trips.
    assert len(tok.encode(["the"])[0]) == 1
    for text in ROUND_TRIP_TEXTS:
        assert tok.decode(tok.encode([text])[0]) == text
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["bpe.json"]  # no temporary files left

    assert train_tokenizer.main([*argv[:-1], "100", "--kind", "bpe"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--vocab-size 100: a byte-level BPE needs at least 260" in err


def test_a_tokenizer_trained_on_parquet_shards_matches_one_trained_on_text(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    docs = make_docs(200, seed=10)
    txt = write_text(tmp_path / "c.txt", docs)
    pq.write_table(pa.table({"body": docs}), tmp_path / "c.parquet")
    a = train_tokenizer.train_bpe_tokenizer([txt], tmp_path / "a", 300)
    b = train_tokenizer.train_bpe_tokenizer([tmp_path / "c.parquet"], tmp_path / "b", 300, text_key="body")
    assert a.read_bytes() == b.read_bytes()
