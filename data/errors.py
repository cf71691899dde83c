"""Errors that mean bad data input (a file, a record, a tokenizer, a preprocessing option), never a bug.

They are `UserError`s: the command-line tools print their one-line message (naming the file and the fix) and exit 2.
"""

from __future__ import annotations

from model.errors import UserError


class DataError(UserError):
    """A data file, record, tokenizer or preprocessing option that cannot be used: `path: what is wrong; fix`."""


class MissingDataError(DataError, FileNotFoundError):
    """A data file or tokenizer that does not exist."""


class MissingPackageError(UserError, ImportError):
    """An optional package an input format or tokenizer kind needs is not installed; names the pip command."""
