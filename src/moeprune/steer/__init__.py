"""Expert steering (MoTE): find the experts whose routing differs between text with and without a behaviour (the
fTRI contrast), write a steering plan, and apply it inside the model's own router at inference.

    contrast.py  ExpertStats of two groups of sets -> per (layer, expert) frequency / gate-mass difference, z-score
    plan.py      SteerPlan: experts switched off or forced on (with a strength), JSON, validated on load
    apply.py     steering(model, plan) / apply_steering(model, plan): the plan inside the routers (models/masking.py)
    run.py       `moeprune steer`: calibrate both groups, contrast, plan, measured effect
"""
