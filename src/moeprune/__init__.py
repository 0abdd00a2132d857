"""moeprune: prune and merge the experts of Mixture-of-Experts LLMs into smaller, verified checkpoints."""

__version__ = "0.1.0"

from moeprune.errors import MoePruneError  # noqa: E402

__all__ = ["MoePruneError", "__version__"]
