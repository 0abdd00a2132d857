"""moeprune: prune and merge the experts of Mixture-of-Experts LLMs into smaller, verified checkpoints."""

__version__ = "0.1.0"

from moeprune.errors import MoePruneError  # noqa: E402


def load_model(path, dtype: str = "auto", device: str = "cpu", routing: bool = True):
    """Load any moeprune output (or any local checkpoint): stock `from_pretrained` when the folder is
    stock-loadable, moeprune's loader for non-uniform expert widths (`io/nonuniform.py`). A routing policy in the
    export's config.json (`moeprune_routing`: top_p, naee_skip) is applied unless `routing=False`."""
    from moeprune.io.load import load_model as _load

    return _load(path, dtype=dtype, device=device, routing=routing)


def prune(model, out, recipe=None, **kwargs):
    """`moeprune.prune(model, out, recipe=[{"method": "tcess_top1", "ratio": 0.25}, ...], calib=...)`: see
    `moeprune.api.prune` (one stage's `method=`/`ratio=` work too)."""
    from moeprune.api import prune as _prune

    return _prune(model, out, recipe, **kwargs)


__all__ = ["MoePruneError", "__version__", "load_model", "prune"]
