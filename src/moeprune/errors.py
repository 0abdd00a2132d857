"""The one exception type users see. Its message always says what to change."""


class MoePruneError(Exception):
    """A user-facing error: bad input, unsupported model, failed verification.

    The CLI prints the message (no traceback) and exits with status 2.
    """
