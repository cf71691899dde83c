"""The run's sentencepiece tokenizer in a Hugging Face export: `tokenizer.model` plus a `tokenizer_config.json` that
loads it as `LlamaTokenizer` (transformers converts the model; that conversion needs the protobuf package).

No BOS or EOS is added on encoding: our preprocessing writes documents as their ids followed by EOS only. Known
differences of transformers 5.23's LlamaTokenizer from sentencepiece (measured, see `probe`): a text that starts
with a space or with a newline loses sentencepiece's dummy-prefix piece, and a BPE tokenizer is assumed (a unigram
model segments differently). `probe` checks the export on a few texts and reports what differs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "First line\nsecond line\n\nthird, with  two spaces and a tab\tend",
    "Zahlen 1234567890, Umlaute äöü, emoji 😀 and <s> </s> written out",
)


def special_ids(model_file: Path) -> dict[str, int | None]:
    """bos/eos/pad ids of a sentencepiece model (None for a piece it does not have)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}
    return {k: (v if v >= 0 else None) for k, v in ids.items()}


def export_tokenizer(model_file: Path, out_dir: Path, max_len: int) -> list[str]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if i >= 0 else None

    shutil.copyfile(model_file, out_dir / "tokenizer.model")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": piece(sp.unk_id()),
        "bos_token": piece(sp.bos_id()),
        "eos_token": piece(sp.eos_id()),
        "pad_token": piece(sp.pad_id()),
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
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ["tokenizer.model", "tokenizer_config.json"]


def probe(model_file: Path, hf_dir: Path) -> str:
    """One line: does AutoTokenizer on the export give sentencepiece's ids on PROBE_TEXTS?"""
    try:
        import google.protobuf  # noqa: F401 - transformers needs it to convert tokenizer.model
        import sentencepiece as spm
        from transformers import AutoTokenizer
    except ImportError as e:
        return f"tokenizer not checked ({e.name} is not installed)"
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    bad = [t for t in PROBE_TEXTS if tok(t)["input_ids"] != sp.encode(t)]
    if bad:
        return f"WARNING: transformers' tokenizer differs from sentencepiece on {len(bad)} of the probe texts"
    return f"tokenizer: transformers' ids equal sentencepiece's on {len(PROBE_TEXTS)} probe texts"
