"""Optional packages, imported only where an input format or tokenizer kind needs them."""

from __future__ import annotations

import importlib
from types import ModuleType

from data.errors import MissingPackageError

# The pinned versions (pyproject.toml, extras `data` and `dev`).
PINS = {
    "sentencepiece": "sentencepiece==0.2.3",
    "tokenizers": "tokenizers==0.23.3",
    "tiktoken": "tiktoken==0.14.0",
    "pyarrow": "pyarrow==26.0.1",
    "zstandard": "zstandard==0.25.0",
}


def import_optional(module: str, needed_for: str) -> ModuleType:
    """`module` (a key of PINS, or a submodule of one), or a one-line ImportError naming the package and its pip
    command."""
    package = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingPackageError(
            f"{package} is not installed; {needed_for} needs it: pip install {PINS[package]} (or pip install -e "
            "'.[data]')"
        ) from None
