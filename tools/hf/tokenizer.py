"""The run's tokenizer in a Hugging Face export, so that `AutoTokenizer.from_pretrained(folder)` gives our ids.

- sentencepiece `.model`: `tokenizer.model` + a `tokenizer_config.json` loading it as `LlamaTokenizer`
  (transformers converts the model; that conversion needs the protobuf package).
- `tokenizer.json` (or its folder): the same `tokenizer.json` + a `tokenizer_config.json` of class
  `PreTrainedTokenizerFast` with the special tokens (and the source's `chat_template`, if any).
- `.tiktoken`: a `tokenizer.json` converted by transformers' `TikTokenConverter` (same pattern, EOD id N) + the
  same config.

Special tokens written in a text stay text (`split_special_tokens`), as in our preprocessing. For sentencepiece no
BOS or EOS is added on encoding: our preprocessing writes documents as their ids followed by EOS only. Known
differences of transformers 5.23's LlamaTokenizer from sentencepiece (measured, see `probe`): a text that starts
with a space or with a newline loses sentencepiece's dummy-prefix piece, and a BPE tokenizer is assumed (a unigram
model segments differently). `probe` checks the export on a few texts and reports what differs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from data.tokenizer import TIKTOKEN_PATTERN, HuggingFaceTokenizer, TiktokenTokenizer, Tokenizer

PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "First line\nsecond line\n\nthird, with  two spaces and a tab\tend",
    "Zahlen 1234567890, Umlaute äöü, emoji 😀 and <s> </s> <|endoftext|> written out",
)


def special_ids(tokenizer: Tokenizer) -> dict[str, int | None]:
    """bos/eos/pad ids for config.json (None for a token the tokenizer does not have)."""
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}


def export_tokenizer(tokenizer: Tokenizer, out_dir: Path, max_len: int) -> list[str]:
    if isinstance(tokenizer, HuggingFaceTokenizer):
        shutil.copyfile(tokenizer.json_file, out_dir / "tokenizer.json")
        source_config = tokenizer.json_file.with_name("tokenizer_config.json")
        extra = {}
        if tokenizer.json_file.name == "tokenizer.json" and source_config.is_file():
            chat_template = json.loads(source_config.read_text(encoding="utf-8")).get("chat_template")
            extra = {"chat_template": chat_template} if chat_template else {}
        _write_config(out_dir, _fast_config(tokenizer, max_len) | extra)
        return ["tokenizer.json", "tokenizer_config.json"]
    if isinstance(tokenizer, TiktokenTokenizer):
        _tiktoken_to_fast(tokenizer).save(str(out_dir / "tokenizer.json"))
        _write_config(out_dir, _fast_config(tokenizer, max_len))
        return ["tokenizer.json", "tokenizer_config.json"]
    shutil.copyfile(tokenizer.path, out_dir / "tokenizer.model")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        **{f"{role}_token": tokenizer.special_tokens.get(role) for role in ("unk", "bos", "eos", "pad")},
        "add_bos_token": False,
        "add_eos_token": False,
        # sentencepiece's dummy prefix ("▁" before the first word).
        "add_prefix_space": True,
        "legacy": False,
        # "<s>" typed in a text is text, as for sentencepiece, not the control token.
        "split_special_tokens": True,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }
    _write_config(out_dir, config)
    return ["tokenizer.model", "tokenizer_config.json"]


def _fast_config(tokenizer: Tokenizer, max_len: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{f"{role}_token": token for role, token in tokenizer.special_tokens.items()},
        # "</s>" typed in a text is text, as in our preprocessing.
        "split_special_tokens": True,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }


def _write_config(out_dir: Path, config: dict) -> None:
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _tiktoken_to_fast(tokenizer: TiktokenTokenizer):  # -> tokenizers.Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _FromRanks(TikTokenConverter):
        # The ranks our tokenizer loaded, not a second read of the file through tiktoken's path-keyed cache.
        def load_tiktoken_bpe(self, _path: str) -> dict[bytes, int]:
            return tokenizer.ranks

    # The converter appends each special token after the ranks: <|endoftext|> gets id N, as in TiktokenTokenizer.
    return _FromRanks(
        vocab_file=str(tokenizer.path), pattern=TIKTOKEN_PATTERN, extra_special_tokens=[tokenizer.special_tokens["eos"]]
    ).converted()


def probe(tokenizer: Tokenizer, hf_dir: Path) -> str:
    """One line: does AutoTokenizer on the export give our ids on PROBE_TEXTS?"""
    try:
        if tokenizer.kind == "sentencepiece":
            import google.protobuf  # noqa: F401 - transformers needs it to convert tokenizer.model
        from transformers import AutoTokenizer
    except ImportError as e:
        return f"tokenizer not checked ({e.name} is not installed)"
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    bad = [t for t in PROBE_TEXTS if tok(t)["input_ids"] != tokenizer.encode([t])[0]]
    if bad:
        return f"WARNING: transformers' tokenizer differs from our {tokenizer.kind} tokenizer on {len(bad)} probe texts"
    return f"tokenizer: transformers' ids equal our {tokenizer.kind} tokenizer's on {len(PROBE_TEXTS)} probe texts"
