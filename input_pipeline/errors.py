"""The one user-facing error type of portrait-jax.

Anything caused by the user's input (a missing or unreadable file, a corrupt video, a bad flag value, a
face that cannot be found) raises :class:`UserError` with a one-line message that names the file and the
problem. The command-line tools catch it, print ``error: <message>`` on stderr and exit with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os


class UserError(Exception):
    """A problem with the user's input, reported as one line naming the file and the problem."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        message = " ".join(str(message).split())  # always one line
        if path is not None:
            message = f"{os.fspath(path)}: {message}"
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)
