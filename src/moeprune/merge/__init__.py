"""Expert merging: several experts of a MoE layer become one, so the expert tensors really shrink.

Pure tensor math on experts in the canonical role orientation (gate/up [I, H], down [H, I], optional biases):
- `align`: neuron permutations (weight matching, MC-SMoE / Git Re-Basin) that put members onto an anchor;
- `average`: frequency-weighted averaging of aligned members (M-SMoE, HC-SMoE);
- `svd`: Sub-MoE joint SVD with a shared left basis, merged right factors and optional rank truncation;
- `dern`: DERN neuron recombination of dropped experts into any survivor; `dern_threshold`: its cosine chosen
  from the segment similarities (`threshold: auto`, `recombine`);
- `methods`: registry plan.merge -> layer-level merge; `grouping`: which experts merge (msmoe, hcsmoe, submoe, dern)
  from calibration statistics; `plan`: the JSON merge plan; `build`: plans from statistics.
Surgery on a model: `surgery/merge.py`; merging as a recipe stage (options, plan, apply, verification
reference): `stages/merge.py`.
"""

from moeprune.merge.align import align_group, permutation_to, permute, similarity
from moeprune.merge.average import merge_average
from moeprune.merge.svd import joint_svd_factors, merge_svd

__all__ = ["align_group", "joint_svd_factors", "merge_average", "merge_svd", "permutation_to", "permute",
           "similarity"]
