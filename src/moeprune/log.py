"""The package's single logger. Library code logs; only the CLI configures handlers."""

import logging

logger = logging.getLogger("moeprune")


def configure(verbose: bool = False) -> None:
    """Attach a plain stderr handler once (CLI only)."""
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[moeprune] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
