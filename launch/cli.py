"""Shared command-line plumbing: one-line errors for bad input, quiet TensorFlow, absl entry points."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before anything imports TensorFlow


def quiet_library_logs() -> None:
    """Drops INFO lines of Orbax/Grain/absl-internals from the log (warnings and errors still show)."""
    import logging

    from absl import logging as absl_logging

    class _Filter(logging.Filter):
        def filter(self, record):
            return record.levelno >= logging.WARNING or not any(
                part in record.pathname for part in ("/orbax/", "/grain/", "/etils/"))

    absl_logging.get_absl_handler().addFilter(_Filter())


def run(main) -> None:
    """``absl.app.run(main)``, with :class:`UserError` printed as one ``error:`` line and exit status 2."""
    from absl import app

    from input_pipeline.errors import UserError

    def wrapped(argv):
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(wrapped)
