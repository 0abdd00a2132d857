"""Compression stages: one registered `Stage` per kind of step (`base.py`), each in its own file.

    experts   expert removal: criteria + policies, NAEE, prune-as-you-go   (`experts.py`)
    merge     expert merging: M-SMoE, HC-SMoE, Sub-MoE, DERN                (`merge.py`)
    neurons   neuron removal inside experts: HEAPr, CAMERA-P              (`neurons.py`)
    compress  MC-SMoE's low-rank + sparse decomposition of merged experts (`compress.py`; new values, `weights.py`)
    repair    closed-form repair of the stage before: obs, compensate, router (`repair.py`; new values, `weights.py`)
    distill   distillation from the original model: routers, experts or LoRA (`distill.py`; new values, `weights.py`)
    quantize  weight-only integer quantization (RTN, GPTQ), compressed-tensors export; always last (`quantize.py`)
    sparsity  unstructured / 2:4 sparsity inside experts: Wanda, OWL (`sparsity.py`; new values, `weights.py`)
    routing   inference-time routing policies: topk, top_p, naee_skip; always last (`routing.py`)
`reference.py` builds the chained verification reference on the original model.
"""

from moeprune.stages import (  # noqa: F401  (register the stages)
    compress,
    distill,
    experts,
    merge,
    neurons,
    quantize,
    repair,
    routing,
    sparsity,
)
from moeprune.stages.base import STAGES, Need, Stage, StageOptions, stage_for_format, stage_for_method

__all__ = ["STAGES", "Need", "Stage", "StageOptions", "stage_for_format", "stage_for_method"]
