"""The one exception type users see. Its message always says what to change."""


class MoePruneError(Exception):
    """A user-facing error: bad input, unsupported model, failed verification.

    The CLI prints the message (no traceback) and exits with status 2.
    """


class UnsupportedLayout(MoePruneError):
    """The model's layout does not allow this method (e.g. neuron surgery on up-only experts). The family × verb
    table (benchmarks/families.py) reports these as "n/a", not as failures."""
