"""Plans and budgets that cannot be honoured are refused with a MoePruneError that names what to change:
malformed merge-plan JSON (never a KeyError/TypeError/ValueError), merge plans that do not fit the model (the bad
index, layer and valid range named), and neuron budgets that the aligned widths / min-width cannot keep exactly
(refused by `check_budget` before any score exists)."""

from __future__ import annotations

import pytest
import torch

from moeprune.errors import MoePruneError
from moeprune.select.neurons import check_budget, expert_width_kept, select_neurons

# ---------------------------------------------------------------------------------------- neuron budgets


def test_unachievable_aligned_ratio_is_refused_with_the_nearby_achievable_ratios():
    # width 64, align 8: 0.99 keeps 0.64 neurons -> the narrowest aligned width is 8, i.e. removes 0.875
    assert expert_width_kept(0.99, 64, 1, 8) == 8  # what the selection would silently have done
    with pytest.raises(MoePruneError) as info:
        check_budget(0.99, "expert", 1, 64, align=8)
    msg = str(info.value)
    assert "--ratio 0.99" in msg and "0.875" in msg and "0.75" in msg, msg  # removed fractions of widths 8 and 16
    assert "multiples of 8" in msg and "grouped_mm" in msg, msg
    assert "min-width" not in msg, msg  # min_width 1 is not the cause
    with pytest.raises(MoePruneError, match="Achievable ratios nearby: 0.75 .* or 0.875"):
        select_neurons({1: torch.rand(2, 64)}, 0.99, "expert", align=8)


@pytest.mark.parametrize("ratio,kept", [(0.25, 48), (0.5, 32), (0.875, 8), (0.3, 48), (0.45, 32)])
def test_achievable_aligned_ratios_are_accepted(ratio, kept):
    check_budget(ratio, "expert", 1, 64, align=8)  # 0.3 and 0.45: within half a step (8/128) of 0.25 / 0.5
    got = select_neurons({1: torch.rand(3, 64, generator=torch.Generator().manual_seed(0))}, ratio, "expert", align=8)
    assert {len(v) for v in got[1].values()} == {kept}


def test_every_accepted_expert_budget_is_honoured_within_half_an_alignment_step():
    for width in (16, 60, 64, 96):
        for align in (1, 8):
            for min_width in (1, 5, 12):
                for ratio in [k / 200 for k in range(1, 200)]:
                    try:
                        check_budget(ratio, "expert", min_width, width, align=align)
                    except MoePruneError:
                        continue
                    n = expert_width_kept(ratio, width, min_width, align)
                    assert n % align == 0 and min_width <= n < width, (width, align, min_width, ratio, n)
                    assert abs(1 - n / width - ratio) <= align / (2 * width) + 1e-9, (width, align, ratio, n)


def test_ratio_that_removes_nothing_is_refused():
    with pytest.raises(MoePruneError, match="nothing would be removed.*0.125 \\(keeps 56"):
        check_budget(0.05, "expert", 1, 64, align=8)
    with pytest.raises(MoePruneError, match="nothing would be removed"):
        check_budget(0.001, "expert", 1, 64)
    with pytest.raises(MoePruneError, match="cannot narrow experts of width 8"):
        check_budget(0.5, "expert", 1, 8, align=8)
    with pytest.raises(MoePruneError, match="nothing would be removed"):
        check_budget(1e-4, "global", 1, 16, num_experts=8, num_layers=2)


def test_expert_budget_min_width_that_overrides_the_ratio_is_named():
    with pytest.raises(MoePruneError) as info:
        check_budget(0.75, "expert", 20, 64, align=8)  # ratio keeps 16; min-width 20 -> 24 (aligned)
    msg = str(info.value)
    assert "--min-width 20 forces 24" in msg and "keeps 16 of 64" in msg and "Lower --min-width to at most 16" in msg
    with pytest.raises(MoePruneError, match="--min-width 20 forces 20 neurons"):
        check_budget(0.75, "expert", 20, 64)
    check_budget(0.75, "expert", 16, 64)  # min-width equal to the kept width: fine
    with pytest.raises(MoePruneError, match="--min-width 65 must lie in \\[1, expert width 64\\]"):
        check_budget(0.5, "expert", 65, 64)


@pytest.mark.parametrize("budget,G", [("layer", 1), ("global", 3)])
def test_layer_and_global_budgets_refused_before_any_scores(budget, G):
    E, I = 8, 16
    # min_width 3 needs G·E·3 neurons; ratio 0.9 keeps round(0.1·G·E·I) = 0.1·128·G < 3·8·G
    with pytest.raises(MoePruneError) as info:
        check_budget(0.9, budget, 3, I, num_experts=E, num_layers=G)
    msg = str(info.value)
    assert f"--min-width 3 alone needs {G * E * 3}" in msg and "lower --min-width to at most 1" in msg, msg
    # min_width 1 cannot be lowered: suggest lowering --ratio only
    with pytest.raises(MoePruneError) as info:
        check_budget(0.99, budget, 1, I, num_experts=E, num_layers=G)
    msg = str(info.value)
    assert "lower --ratio to at most" in msg and "lower --min-width" not in msg, msg
    # the limit: every expert keeps exactly min_width
    check_budget(1 - 3 / I, budget, 3, I, num_experts=E, num_layers=G)
    # without counts (old callers) the layer/global totals cannot be checked yet: no refusal
    check_budget(0.9, budget, 3, I)


def test_select_neurons_min_width_message_logic():
    scores = {1: torch.rand(4, 12), 3: torch.rand(4, 12)}
    with pytest.raises(MoePruneError) as info:
        select_neurons(scores, 0.95, "global", min_width=1)  # keeps 5 of 96, 8 experts need one each
    assert "lower --min-width" not in str(info.value) and "lower --ratio" in str(info.value)
    with pytest.raises(MoePruneError, match="min-width 10 alone needs 80.*lower --min-width to at most 6"):
        select_neurons(scores, 0.5, "global", min_width=10)
    with pytest.raises(MoePruneError, match="min-width 7 alone needs 28"):
        select_neurons(scores, 0.5, "layer", min_width=7)  # each layer keeps 24 < 4·7
