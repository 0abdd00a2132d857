"""Inference-time routing policies: fewer experts per token, applied inside the model's own router.

    rules.py    the per-token rules (topk, top_p, naee_skip) as pure functions of the router's outputs
    plan.py     RoutingPlan (JSON, format moeprune.routing/1; the `moeprune_routing` block of an export's config)
    fit.py      thresholds from calibration text: NAEE's β, and a target average of active experts per token
    otp.py      MC# OTP: learned per-layer selectors (rule, training, side file)
    apply.py    install a plan on a model (`models/dynamic.py`), read one from a file or an export, savings report
The stage that makes plans is `stages/routing.py`; docs/routing.md says what each policy does per family.
"""
