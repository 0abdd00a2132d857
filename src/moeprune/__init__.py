"""moeprune: prune and merge the experts of Mixture-of-Experts LLMs into smaller, verified checkpoints."""

__version__ = "0.1.0"

from moeprune.errors import MoePruneError  # noqa: E402


def load_model(path, dtype: str = "auto", device: str = "cpu", routing: bool = True, steer=None):
    """Load any moeprune output (or any local checkpoint): stock `from_pretrained` when the folder is
    stock-loadable, moeprune's loader for non-uniform expert widths (`io/nonuniform.py`). A routing policy in the
    export's config.json (`moeprune_routing`: top_p, naee_skip) is applied unless `routing=False`.

    `steer`: a steering plan (`moeprune steer`; a SteerPlan, its JSON file or dict) applied inside the routers for
    the model's lifetime (`moeprune.steer.apply.apply_steering`; the handle is `model.moeprune_steering`, whose
    `.remove()` restores plain routing). No checkpoint is written."""
    from moeprune.io.load import load_model as _load

    plan = None
    if steer is not None:
        from moeprune.steer.plan import as_plan

        plan = as_plan(steer)  # a bad plan is refused before the model loads
    model = _load(path, dtype=dtype, device=device, routing=routing)
    if plan is not None:
        from moeprune.steer.apply import apply_steering

        model.moeprune_steering = apply_steering(model, plan)
    return model


def prune(model, out, recipe=None, **kwargs):
    """`moeprune.prune(model, out, recipe=[{"method": "tcess_top1", "ratio": 0.25}, ...], calib=...)`: see
    `moeprune.api.prune` (one stage's `method=`/`ratio=` work too)."""
    from moeprune.api import prune as _prune

    return _prune(model, out, recipe, **kwargs)


def load_for_task(pack, prompt=None, ratio=None, task=None, margin=None, **kwargs):
    """`moeprune.load_for_task(PACK, prompt=..., ratio=0.5)`: the prompt's task (nearest retrieval key of a task
    pack, `moeprune taskpack build`) or the named `task`, loaded with only its kept experts read from the shards;
    `.model`, `.task`, `.margin`, `.bytes_read`, `.kept` (see `moeprune.taskpack.load.load_for_task`)."""
    from moeprune.taskpack.load import load_for_task as _load

    return _load(pack, prompt=prompt, ratio=ratio, task=task, margin=margin, **kwargs)


__all__ = ["MoePruneError", "__version__", "load_for_task", "load_model", "prune"]
