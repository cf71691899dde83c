"""The base of every error that means bad input (config, data, checkpoint, command line) rather than a bug.

Its message is one line naming the file or key and the fix; the command-line tools print it and exit with code 2.
Any other exception is a bug and keeps its traceback. Standard library only, so every package may import it.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input, reported as one line: `file or dotted.key: what is wrong; what to do`."""
