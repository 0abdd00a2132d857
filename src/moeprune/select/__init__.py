"""Selection: scores -> plans. Expert scores -> `PrunePlan` under a policy (`plan.py`, `policies.py`, `build.py`);
neuron scores -> `NeuronPlan` under a budget (`neurons.py`, `neuron_plan.py`)."""

from moeprune.select.plan import PrunePlan
from moeprune.select.uniform import drop_count, select_uniform

__all__ = ["PrunePlan", "drop_count", "select_uniform"]
