"""The package's single logger. Library code logs; only the CLI configures handlers.

The CLI handler writes through `tqdm.write`, which clears the active progress bars, prints the line and redraws
the bars, so a log line never lands glued to the end of a bar.
"""

import logging
import sys

from tqdm import tqdm

logger = logging.getLogger("moeprune")


class TqdmHandler(logging.Handler):
    """A logging handler that prints each record with `tqdm.write` to stderr (looked up at each record, so
    redirecting sys.stderr redirects the log too)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


def configure(verbose: bool = False) -> None:
    """Attach the stderr handler once (CLI only)."""
    if not logger.handlers:
        handler = TqdmHandler()
        handler.setFormatter(logging.Formatter("[moeprune] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
