"""The trained sentencepiece tokenizer as training, preprocessing and export see it.

Conventions of tools/train_tokenizer.py: unk 0, bos 1, eos 2, pad 3; end-of-document (EOD) is eos. sentencepiece
is imported only here, when a model is loaded, so the synthetic and byte-level paths never need it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _sentencepiece() -> Any:
    try:
        import sentencepiece
    except ImportError:  # the pinned core dependency; missing only in a hand-made environment
        raise ImportError("sentencepiece is not installed; pip install sentencepiece==0.2.3") from None
    return sentencepiece


class Tokenizer:
    def __init__(self, model_path: str | Path) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer model not found; train one with tools/train_tokenizer.py")
        spm = _sentencepiece()
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except RuntimeError:
            raise ValueError(
                f"{path}: not a sentencepiece model; pass the .model file written by tools/train_tokenizer.py"
            ) from None
        self.path = path
        if self._sp.eos_id() < 0:
            raise ValueError(f"{path}: the tokenizer has no eos piece to mark end-of-document; retrain it with eos")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod_id(self) -> int:
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    def encode(self, texts: list[str]) -> list[list[int]]:
        # One thread per call: parallelism comes from worker processes, which keeps "--workers N" meaning N cores.
        return self._sp.encode(texts, num_threads=1)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)


def tokenizer_vocab_size(model_path: str | Path) -> int:
    return Tokenizer(model_path).vocab_size
