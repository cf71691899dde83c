"""The tokenizer a dataset is built with, whatever its kind, as preprocessing, the config check, tools and the export
see it. `data.tokenizer` / `--tokenizer` names one of:

| path | kind | library |
|---|---|---|
| a `.model` file (any file not matched below) | `sentencepiece` | sentencepiece |
| a `tokenizer.json` (any `.json`), or a folder holding `tokenizer.json` | `huggingface` | tokenizers |
| a `.tiktoken` file | `tiktoken` | tiktoken |

Every kind gives `encode(texts)` (ids of each text, without EOD: preprocessing appends `eod_id` after every
document), `decode(ids)` (special tokens left out), `vocab_size` (every id is below it), `eos_id` = `eod_id` (the
end-of-document token), `bos_id` and `pad_id` (None when the tokenizer has none). A special token written in a text
("</s>", "<|endoftext|>") is encoded as text, so no document can forge a document boundary.

- sentencepiece: the conventions of tools/train_tokenizer.py (unk 0, bos 1, eos 2, pad 3); nothing is added.
- huggingface: the tokenizer's own post-processor is applied, as `transformers.AutoTokenizer` does (Llama 3's adds
  BOS; the one tools/train_tokenizer.py --kind bpe writes adds nothing). Special tokens come from the
  `tokenizer_config.json` next to `tokenizer.json` (in a folder, or beside a file named `tokenizer.json`), else from
  the tokenizer's special tokens by their usual names (eos: `</s>`, `<|endoftext|>`, `<|end_of_text|>`, `<eos>`;
  bos: `<s>`, `<|begin_of_text|>`, `<bos>`; pad: `<pad>`).
- tiktoken: a local `.tiktoken` file (one `base64(token bytes) rank` line per token, ranks 0..N-1, tiktoken's own
  format) split with cl100k_base's pattern (`TIKTOKEN_PATTERN`); `<|endoftext|>` = id N is EOD, so the vocabulary is
  N + 1. Ordinary text gets the ids tiktoken's `cl100k_base` gives when the file is cl100k_base's; its EOD id differs
  (tiktoken numbers its special tokens from 100257). Named encodings download their file, so download it once where
  there is a network and pass the file.

Each library is imported only when its kind is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

from data.errors import DataError, MissingDataError
from data.optional import import_optional

TIKTOKEN_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)
TIKTOKEN_EOD = "<|endoftext|>"
# Names of special tokens by role, used when a tokenizer.json comes without a tokenizer_config.json.
SPECIAL_NAMES = {
    "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>"),
    "bos": ("<s>", "<|begin_of_text|>", "<bos>"),
    "pad": ("<pad>",),
    "unk": ("<unk>",),
}
KINDS_HELP = "a sentencepiece .model, a tokenizer.json or a folder holding one, or a .tiktoken file"


class Tokenizer(ABC):
    kind: ClassVar[str]

    def __init__(self, path: Path) -> None:
        self.path = path
        self.vocab_size = 0
        self.eos_id = -1
        self.bos_id: int | None = None
        self.pad_id: int | None = None
        # role ("bos", "eos", "pad", "unk") -> the token's text, for the tokenizer_config.json of an export.
        self.special_tokens: dict[str, str] = {}

    @property
    def eod_id(self) -> int:
        return self.eos_id

    @abstractmethod
    def encode(self, texts: list[str]) -> list[list[int]]: ...

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    def describe(self) -> str:
        return f"{self.kind} tokenizer {self.path} ({self.vocab_size:,} ids, EOD {self.eod_id})"


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        spm = import_optional("sentencepiece", "a sentencepiece tokenizer")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except RuntimeError:
            raise DataError(
                f"{path}: not a sentencepiece model; pass the .model file written by tools/train_tokenizer.py, or "
                f"{KINDS_HELP}"
            ) from None
        sp = self._sp
        if sp.eos_id() < 0:
            raise DataError(f"{path}: the tokenizer has no eos piece to mark end-of-document; retrain it with eos")
        self.vocab_size = sp.get_piece_size()
        self.eos_id = sp.eos_id()
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else None
        roles = {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()}
        self.special_tokens = {role: sp.id_to_piece(i) for role, i in roles.items() if i >= 0}

    def encode(self, texts: list[str]) -> list[list[int]]:
        # One thread per call: parallelism comes from worker processes, which keeps "--workers N" meaning N cores.
        return self._sp.encode(texts, num_threads=1)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)


class HuggingFaceTokenizer(Tokenizer):
    kind = "huggingface"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        tokenizers = import_optional("tokenizers", "a Hugging Face tokenizer.json")
        self.json_file, config_file = hf_tokenizer_files(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.json_file))
        except Exception as e:  # the library raises a bare Exception for any unreadable file
            raise DataError(f"{self.json_file}: not a Hugging Face tokenizer.json ({_first_line(e)})") from None
        # "</s>" written in a document is text, never the special token (as for the other kinds).
        self._tok.encode_special_tokens = True
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self.special_tokens = self._special_tokens(vocab, config_file)
        if "eos" not in self.special_tokens:
            raise DataError(
                f"{self.json_file}: no end-of-document token (none of {', '.join(SPECIAL_NAMES['eos'])}); put a "
                "tokenizer_config.json with eos_token next to a file named tokenizer.json"
            )
        self.eos_id = vocab[self.special_tokens["eos"]]
        self.bos_id = vocab.get(self.special_tokens.get("bos", ""))
        self.pad_id = vocab.get(self.special_tokens.get("pad", ""))

    def _special_tokens(self, vocab: dict[str, int], config_file: Path | None) -> dict[str, str]:
        if config_file is not None:
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{config_file}: not valid JSON ({e}); fix or remove it") from None
            found = {}
            for role in SPECIAL_NAMES:
                token = config.get(f"{role}_token")
                token = token.get("content") if isinstance(token, dict) else token
                if token is None:
                    continue
                if token not in vocab:
                    raise DataError(f"{config_file}: {role}_token {token!r} is not in {self.json_file.name}")
                found[role] = token
            if "eos" in found:
                return found
        special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        names = {role: [n for n in names if n in special] for role, names in SPECIAL_NAMES.items()}
        return {role: found[0] for role, found in names.items() if found}

    def encode(self, texts: list[str]) -> list[list[int]]:
        with _one_thread():
            encoded = [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=True)]
        # A post-processor that ends every text with EOS (= EOD) is left to preprocessing, which appends one EOD.
        return [ids[:-1] if ids and ids[-1] == self.eos_id else ids for ids in encoded]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


class TiktokenTokenizer(Tokenizer):
    kind = "tiktoken"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        tiktoken = import_optional("tiktoken", "a .tiktoken tokenizer")
        self.ranks = load_tiktoken_ranks(path)
        n = len(self.ranks)
        self._enc = tiktoken.Encoding(
            name=path.stem, pat_str=TIKTOKEN_PATTERN, mergeable_ranks=self.ranks, special_tokens={TIKTOKEN_EOD: n}
        )
        self.vocab_size = n + 1
        self.eos_id = n
        self.special_tokens = {"eos": TIKTOKEN_EOD}

    def encode(self, texts: list[str]) -> list[list[int]]:
        # encode_ordinary: "<|endoftext|>" in a text is text. One thread: parallelism comes from worker processes.
        return self._enc.encode_ordinary_batch(texts, num_threads=1)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode([i for i in ids if i != self.eos_id])


def load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """token bytes -> rank, checked: ranks 0..N-1, every single byte has one (tiktoken cannot encode without)."""
    load = import_optional("tiktoken.load", "a .tiktoken tokenizer").load_tiktoken_bpe
    data = path.read_bytes()
    try:
        # tiktoken caches every file it reads under its path; the hash makes it re-read a file changed since.
        ranks = load(str(path), expected_hash=hashlib.sha256(data).hexdigest())
    except ValueError as e:
        raise DataError(f"{path}: not a tiktoken BPE file (lines of base64 token and rank): {_first_line(e)}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise DataError(f"{path}: ranks must be 0..{len(ranks) - 1}, each once; renumber the file")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise DataError(f"{path}: {len(missing)} of the 256 single bytes have no rank (e.g. {missing[0]}); add them")
    return ranks


def hf_tokenizer_files(path: Path) -> tuple[Path, Path | None]:
    """(tokenizer.json, its tokenizer_config.json or None) of a folder or a tokenizer.json file."""
    if path.is_dir():
        json_file = path / "tokenizer.json"
        if not json_file.is_file():
            raise DataError(f"{path}: a folder without tokenizer.json; give {KINDS_HELP}")
        config = path / "tokenizer_config.json"
    else:
        json_file, config = path, path.with_name("tokenizer_config.json")
    return json_file, (config if json_file.name == "tokenizer.json" and config.is_file() else None)


KINDS: dict[str, type[Tokenizer]] = {
    c.kind: c for c in (SentencePieceTokenizer, HuggingFaceTokenizer, TiktokenTokenizer)
}


def tokenizer_kind(path: str | Path) -> str:
    path = Path(path)
    if path.is_dir() or path.suffix == ".json":
        return HuggingFaceTokenizer.kind
    if path.suffix == ".tiktoken":
        return TiktokenTokenizer.kind
    return SentencePieceTokenizer.kind


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.exists():
        raise MissingDataError(
            f"{path}: tokenizer not found; train one with tools/train_tokenizer.py or give {KINDS_HELP}"
        )
    return KINDS[tokenizer_kind(path)](path)


def tokenizer_vocab_size(path: str | Path) -> int:
    return load_tokenizer(path).vocab_size


@contextmanager
def _one_thread() -> Iterator[None]:
    """The tokenizers library spreads a batch over every core unless TOKENIZERS_PARALLELISM is false (it reads the
    variable on every call); one thread per call keeps "--workers N" meaning N cores."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
