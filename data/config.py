"""`data:` configuration: the training corpus, its tokenizer and how documents are packed into windows, validated
before anything runs. Every error is a `ConfigError` naming the dotted key, the reason and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from data.indexed import bin_path, idx_path, normalize_prefix
from data.packing import DocumentPacking
from data.text import EOD_ID as BYTE_EOD_ID
from data.text import VOCAB_SIZE as BYTE_VOCAB_SIZE
from data.text import is_text_path
from model.config import ConfigError, require
from model.errors import UserError


@dataclass
class SyntheticConfig:
    """The embedded default corpus (data/synthetic.py): words = a random head token + a fixed, fully determined
    tail, so hard and easy tokens are mixed and the loss floor is known exactly."""

    # 64 words with tails of up to 6 tokens use at most 449 token ids: within the default model.vocab_size.
    num_words: int = 64  # distinct words in the corpus
    max_tail: int = 6  # longest fully determined tail of a word, in tokens
    zipf_exponent: float = 1.0  # word frequencies follow rank^-zipf_exponent
    num_tokens: int = 1_000_000  # length of the generated token stream


@dataclass
class DatasetConfig:
    """One entry of `data.datasets`: an indexed dataset prefix (PREFIX.bin + PREFIX.idx, from
    tools/preprocess_data.py) or a .txt/.jsonl file for the byte-level fallback, and its blending weight."""

    path: str = ""
    weight: float = 1.0


SYNTHETIC_MAX_PARAMS = 50_000_000  # a toy model: the largest the synthetic corpus trains without data.allow_synthetic


@dataclass
class DataConfig:
    """`data:` the training corpus, its tokenizer and how documents are packed into windows."""

    # null (and no datasets): the embedded synthetic corpus. Otherwise one dataset: an indexed dataset prefix
    # (PREFIX.bin + PREFIX.idx) or a .txt/.jsonl file tokenised byte-level (ids 0..255, end-of-document 256).
    path: str | None = None
    # Several datasets blended by weight (relative; normalised): [{path: ..., weight: ...}, ...]. Excludes `path`.
    datasets: list[DatasetConfig] = field(default_factory=list)
    # The tokenizer the indexed datasets were built with (a sentencepiece .model, a tokenizer.json or its folder, or
    # a .tiktoken file; data/tokenizer.py); when set, its vocabulary is checked against model.vocab_size before
    # training starts, and the Hugging Face export ships it.
    tokenizer: str | None = None
    jsonl_key: str = "text"  # the field of each .jsonl record that holds its text
    seq_len: int = 128  # tokens per training window
    # Share of documents (the last ones of each dataset) held out for validation.
    valid_fraction: float = 0.01
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # Windows are packed across documents; these three treat the documents inside a window apart (data/packing.py).
    # Attention block-causal within each document: no token attends into the previous, unrelated document.
    document_mask: bool = False
    # RoPE positions restart at 0 on the token after each end-of-document token.
    reset_position_ids: bool = False
    # No loss on the prediction made at an end-of-document token (its target is the next document's first token);
    # the step's loss is the mean over the remaining positions of the whole global batch.
    eod_mask_loss: bool = False
    # The end-of-document token id. null: 256 for byte-level .txt/.jsonl data, data.tokenizer's for indexed datasets.
    # Set it for an indexed dataset built without a tokenizer the config names, or with another EOD than its own.
    eod_id: int | None = None
    # The synthetic corpus is for smoke runs: a model larger than a toy (SYNTHETIC_MAX_PARAMS) is refused on it
    # unless this is true.
    allow_synthetic: bool = False

    def validate(self) -> None:
        require(self.seq_len > 0, "data.seq_len", f"must be positive, got {self.seq_len}")
        require(0 <= self.valid_fraction < 1, "data.valid_fraction", "must be in [0, 1)")
        s = self.synthetic
        require(s.num_words >= 2, "data.synthetic.num_words", "must be >= 2")
        require(s.max_tail >= 0, "data.synthetic.max_tail", "must be >= 0")
        require(s.zipf_exponent >= 0, "data.synthetic.zipf_exponent", "must be >= 0")
        require(s.num_tokens > 0, "data.synthetic.num_tokens", "must be positive")
        require(
            self.path is None or not self.datasets,
            "data.datasets",
            "set either data.path (one dataset) or data.datasets (a blend), not both",
        )
        if self.path is not None:
            _check_data_path(self.path, "data.path")
        for i, d in enumerate(self.datasets):
            key = f"data.datasets[{i}]"
            require(bool(d.path), f"{key}.path", "missing; give an indexed dataset prefix or a .txt/.jsonl file")
            require(d.weight > 0, f"{key}.weight", f"must be positive, got {d.weight}")
            _check_data_path(d.path, f"{key}.path")
        kinds = {is_text_path(p) for p in self.paths}
        require(
            len(kinds) <= 1,
            "data.datasets",
            "mixes byte-level .txt/.jsonl files with indexed datasets (different token ids); build indexed datasets "
            "of the text files with tools/preprocess_data.py",
        )
        if self.eod_id is not None:
            require(self.eod_id >= 0, "data.eod_id", f"must be >= 0, got {self.eod_id}")
        if self.tokenizer is not None:
            require(
                Path(self.tokenizer).exists(),
                "data.tokenizer",
                f"{self.tokenizer} does not exist; give a tokenizer from tools/train_tokenizer.py, a tokenizer.json or "
                "its folder, a .tiktoken file, or null",
            )

    @property
    def paths(self) -> list[str]:
        return [self.path] if self.path is not None else [d.path for d in self.datasets]

    def eod_token_id(self) -> int | None:
        """The end-of-document id of the configured data: data.eod_id, else 256 for byte-level files, else
        data.tokenizer's; None for the synthetic corpus (no documents) or an indexed dataset without either."""
        if not self.paths:
            return None
        if self.eod_id is not None:
            return self.eod_id
        if is_text_path(self.paths[0]):
            return BYTE_EOD_ID
        if self.tokenizer is not None:
            from data.tokenizer import load_tokenizer  # the tokenizer library only when one is configured

            try:
                return load_tokenizer(self.tokenizer).eod_id
            except UserError as e:
                raise ConfigError(f"data.tokenizer: {e}") from e
        return None

    def packing(self) -> DocumentPacking | None:
        """What training does with the documents of a window; None when it treats the window as one sequence."""
        if not (self.document_mask or self.reset_position_ids or self.eod_mask_loss):
            return None
        eod = self.eod_token_id()
        assert eod is not None, "validate_documents() rejects document options without an EOD id"
        return DocumentPacking(eod, self.document_mask, self.reset_position_ids, self.eod_mask_loss)

    def validate_documents(self, vocab_size: int) -> None:
        """Cross-section check: the document options need the EOD id, which must be a token of the vocabulary."""
        if self.eod_id is not None:
            require(self.eod_id < vocab_size, "data.eod_id", f"{self.eod_id} >= model.vocab_size={vocab_size}")
            if self.paths and is_text_path(self.paths[0]):
                require(
                    self.eod_id == BYTE_EOD_ID,
                    "data.eod_id",
                    f"byte-level .txt/.jsonl data ends documents with {BYTE_EOD_ID}, not {self.eod_id}; drop "
                    "data.eod_id or set it to 256",
                )
        on = [k for k in ("document_mask", "reset_position_ids", "eod_mask_loss") if getattr(self, k)]
        if not on:
            return
        key = f"data.{on[0]}"
        require(
            bool(self.paths),
            key,
            "the synthetic corpus is one stream without documents; set data.path or data.datasets to data with "
            "end-of-document tokens, or turn it off",
        )
        require(
            self.eod_token_id() is not None,
            key,
            "needs the end-of-document token id, which an indexed dataset does not record; set data.tokenizer (the "
            "tokenizer it was built with) or data.eod_id",
        )

    def check_corpus_fits_model(self, num_params: int) -> None:
        """Refuse to pretrain a model larger than a toy on the synthetic corpus, unless allow_synthetic."""
        require(
            bool(self.paths) or self.allow_synthetic or num_params <= SYNTHETIC_MAX_PARAMS,
            "data.path",
            f"null trains on the embedded synthetic corpus, meant for smoke runs of models up to "
            f"{SYNTHETIC_MAX_PARAMS / 1e6:.0f}M parameters, and this one has {num_params / 1e6:,.0f}M parameters; "
            "set data.path to a dataset from tools/preprocess_data.py, or data.allow_synthetic=true to use it anyway",
        )

    def validate_vocab(self, vocab_size: int) -> None:
        """Cross-section check: the token ids the data can contain must fit model.vocab_size."""
        if not self.paths:
            need = self.synthetic.num_words * (1 + self.synthetic.max_tail) + 1
            require(
                need <= vocab_size,
                "data.synthetic.num_words",
                f"the synthetic corpus may use up to {need} token ids > model.vocab_size={vocab_size}; "
                "use fewer words or a shorter max_tail",
            )
        elif is_text_path(self.paths[0]):
            require(
                vocab_size >= BYTE_VOCAB_SIZE,
                "model.vocab_size",
                f"{vocab_size} < {BYTE_VOCAB_SIZE} needed by the byte-level tokenizer of data.path",
            )
        if self.tokenizer is not None:
            from data.tokenizer import tokenizer_vocab_size  # its library only when a tokenizer is configured

            try:
                n = tokenizer_vocab_size(self.tokenizer)
            except UserError as e:
                raise ConfigError(f"data.tokenizer: {e}") from None
            require(
                n <= vocab_size,
                "data.tokenizer",
                f"vocabulary of {n} tokens > model.vocab_size={vocab_size}; set model.vocab_size >= {n} or use a "
                "smaller tokenizer",
            )


def _check_data_path(path: str, key: str) -> None:
    if is_text_path(path):
        require(
            Path(path).is_file(),
            key,
            f"file {path} does not exist; give an existing .txt/.jsonl file, an indexed dataset prefix, or null "
            "for the synthetic corpus",
        )
        return
    prefix = normalize_prefix(path)
    for p in (idx_path(prefix), bin_path(prefix)):
        require(
            p.is_file(),
            key,
            f"{p} does not exist; build the dataset with tools/preprocess_data.py --output-prefix {prefix}, or "
            "give a .txt/.jsonl file",
        )
