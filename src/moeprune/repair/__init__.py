"""Closed-form repair after a cut: least-squares updates computed from calibration statistics (no gradient steps).

    lstsq.py       the solvers (ridge least squares, OBS neuron-removal update), formulas in docstrings
    capture.py     one decoder layer of the model before the cut (teacher) and after it (student) on the same input
    fixes.py       the repairs, a registry: obs, compensate, router — each proposes new tensors for one layer
    run.py         layer by layer: propose, measure the block error at steps α ∈ {1, ½, ¼}, keep the best (or none)
The stage is `stages/repair.py` ({method: repair, kind: obs|router|compensate|all}, `prune --repair KIND`).
"""
