"""Weight-matching alignment of expert neurons (moeprune.merge.align) and its memo, checked against independent
references (a hand-written SwiGLU expert, brute force over every permutation, scipy's solver on hand-built scores)."""

from __future__ import annotations

import pytest
import torch

from expert_math import (
    I,
    assert_experts_equal,
    expert_forward,
    inputs,
    make_expert,
    random_perm,
)
from moeprune.merge import align_group, permutation_to, permute

# ----------------------------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("bias", [False, True])
def test_exact_permuted_copy_is_recovered(bias):
    orig = make_expert(0, bias=bias)
    sigma = random_perm(1)
    copy = permute(orig, sigma)
    # the copy really is permuted: neuron k of the copy is neuron sigma[k] of the original
    assert torch.equal(copy["gate"][3], orig["gate"][sigma[3]])
    assert torch.equal(copy["down"][:, 3], orig["down"][:, sigma[3]])
    assert not torch.equal(copy["gate"], orig["gate"])
    pi = permutation_to(orig, copy)
    assert pi.dtype == torch.long and pi.shape == (I,)
    assert torch.equal(pi, torch.argsort(sigma)), "π must be σ⁻¹"
    assert_experts_equal(permute(copy, pi), orig)


def test_noisy_permuted_copy_recovers_the_same_permutation():
    orig = make_expert(2, bias=True)
    sigma = random_perm(3)
    g = torch.Generator().manual_seed(4)
    noisy = {k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in permute(orig, sigma).items()}
    assert torch.equal(permutation_to(orig, noisy), torch.argsort(sigma))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_low_precision_experts_match_as_the_float64_scores_do(dtype):
    """bf16 / fp32 experts are matched on float32 scores (`align.match_dtype`); the permutation equals the one the
    exact float64 scores give (built here by hand: gate rows, up rows and down columns, then scipy's solver), for
    unrelated experts and for noisy permuted copies."""
    from scipy.optimize import linear_sum_assignment

    for seed in range(4):
        a = make_expert(70 + seed, inter=96, hidden=64, dtype=dtype)
        b = make_expert(80 + seed, inter=96, hidden=64, dtype=dtype) if seed % 2 else {
            k: (v.double() + 0.5 * make_expert(90 + seed, inter=96, hidden=64)[k]).to(dtype)
            for k, v in permute(a, random_perm(seed, 96)).items()}
        feats = [torch.cat([e["gate"].double(), e["up"].double(), e["down"].double().T], dim=1) for e in (a, b)]
        _, want = linear_sum_assignment((feats[0] @ feats[1].T).numpy(), maximize=True)
        assert torch.equal(permutation_to(a, b), torch.as_tensor(want)), seed


def counted_solves(monkeypatch) -> list[int]:
    """[n]: how many assignments `permutation_to` solves from now on (scipy's solver wrapped), memo emptied."""
    import scipy.optimize

    from moeprune.merge.align_memo import MEMO

    solve, calls = scipy.optimize.linear_sum_assignment, [0]

    def counting(*args, **kwargs):
        calls[0] += 1
        return solve(*args, **kwargs)

    monkeypatch.setattr(scipy.optimize, "linear_sum_assignment", counting)
    MEMO.clear()
    return calls


def test_an_aligned_pair_is_remembered_by_content(monkeypatch):
    """The memo (`merge/align_memo.py`): a pair aligned before is not solved again, a copy of the same tensors hits
    too, a changed weight or another dtype misses, and every answer is the brute-force best permutation (all 6!
    relabellings scored by hand); a full memo drops its oldest permutation."""
    import itertools

    from moeprune.merge.align_memo import MEMO, PermutationMemo

    calls = counted_solves(monkeypatch)

    def brute(ref, other):
        def score(p):
            return sum(float(ref["gate"][k] @ other["gate"][p[k]] + ref["up"][k] @ other["up"][p[k]]
                             + ref["down"][:, k] @ other["down"][:, p[k]]) for k in range(6))
        return torch.tensor(max(itertools.permutations(range(6)), key=score))

    a, b = make_expert(60, inter=6), make_expert(61, inter=6)
    want = brute(a, b)
    assert torch.equal(permutation_to(a, b), want) and calls[0] == 1
    assert torch.equal(permutation_to({k: v.clone() for k, v in a.items()}, b), want) and calls[0] == 1  # a hit
    b["up"][2, 3] += 0.5  # another expert now
    assert torch.equal(permutation_to(a, b), brute(a, b)) and calls[0] == 2
    low = {k: v.float() for k, v in a.items()}, {k: v.float() for k, v in b.items()}
    assert torch.equal(permutation_to(*low), brute(a, b)) and calls[0] == 3  # float32: other bytes, solved again
    assert MEMO.hits == 1 and MEMO.misses == 3
    small = PermutationMemo(max_bytes=2 * 6 * 8)  # room for two permutations of 6
    for n in range(3):
        small.put((bytes([n]), b""), torch.arange(6))
    assert small.get((bytes([0]), b"")) is None and torch.equal(small.get((bytes([2]), b"")), torch.arange(6))


def test_group_alignment_keys_the_memo_by_the_anchor(monkeypatch):
    """align_group hashes its anchor once for all members; the memo keys must still be (anchor, member), so a
    later pairwise call finds them (no solve), and each member comes out permuted by its pair's π."""
    from moeprune.merge.align_memo import MEMO

    calls = counted_solves(monkeypatch)
    a, b, c = make_expert(70, inter=6), make_expert(71, inter=6), make_expert(72, inter=6)
    aligned = align_group([b, a, c], anchor=1)
    assert calls[0] == 2
    for other, got in ((b, aligned[0]), (c, aligned[2])):
        assert torch.equal(got["gate"], permute(other, permutation_to(a, other))["gate"])
    assert calls[0] == 2 and MEMO.hits == 2  # both pairs found under (anchor, member)


def test_alignment_works_in_low_precision():
    orig = make_expert(5, dtype=torch.bfloat16)
    sigma = random_perm(6)
    pi = permutation_to(orig, permute(orig, sigma))
    assert torch.equal(pi, torch.argsort(sigma))


@pytest.mark.parametrize("bias", [False, True])
def test_permuting_neurons_keeps_the_function(bias):
    e = make_expert(7, bias=bias)
    p = permute(e, random_perm(8))
    assert not torch.equal(p["up"], e["up"])
    if bias:
        assert torch.equal(p["down_bias"], e["down_bias"])
    x = inputs()
    torch.testing.assert_close(expert_forward(p, x), expert_forward(e, x), rtol=1e-12, atol=1e-12)
    # a wrong "permutation" (only rows, not down columns) does change it: the check can fail
    broken = dict(e, gate=p["gate"], up=p["up"])
    assert (expert_forward(broken, x) - expert_forward(e, x)).abs().max() > 1e-3


def test_align_group_puts_every_member_on_the_anchor():
    e = make_expert(9, bias=True)
    group = [permute(e, random_perm(s)) for s in (10, 11, 12)]
    aligned = align_group(group, anchor=1)
    for m in aligned:
        assert_experts_equal(m, group[1])


def counted_digests(monkeypatch) -> list[int]:
    """[n]: how many experts `permutation_to` / `align_group` hash from now on."""
    from moeprune.merge import align

    digest, calls = align.expert_digest, [0]

    def counting(expert):
        calls[0] += 1
        return digest(expert)

    monkeypatch.setattr(align, "expert_digest", counting)
    return calls


def test_the_last_alignment_neither_hashes_nor_stores(monkeypatch):
    """`remembering(False)` (nothing aligns after this): with an empty memo no expert is hashed and nothing is
    stored; with a memo that holds the pair, the pair is looked up (hashed, not solved) and a new pair is solved and
    not stored. Every answer is still the brute-force best permutation of scipy's scores."""
    import itertools

    from moeprune.merge.align_memo import MEMO, remembering

    solves, digests = counted_solves(monkeypatch), counted_digests(monkeypatch)

    def brute(ref, other):
        def score(p):
            return sum(float(ref["gate"][k] @ other["gate"][p[k]] + ref["up"][k] @ other["up"][p[k]]
                             + ref["down"][:, k] @ other["down"][:, p[k]]) for k in range(6))
        return torch.tensor(max(itertools.permutations(range(6)), key=score))

    a, b, c = make_expert(80, inter=6), make_expert(81, inter=6), make_expert(82, inter=6)
    with remembering(False):
        assert torch.equal(permutation_to(a, b), brute(a, b))
        aligned = align_group([c, a, b], anchor=1)
    assert digests[0] == 0 and len(MEMO) == 0 and solves[0] == 3
    assert torch.equal(aligned[0]["gate"], permute(c, brute(a, c))["gate"])
    assert torch.equal(permutation_to(a, b), brute(a, b)) and len(MEMO) == 1 and solves[0] == 4  # stored (default)
    digests[0] = 0
    with remembering(False):
        assert torch.equal(permutation_to(a, b), brute(a, b)) and solves[0] == 4  # found: not solved again
        assert torch.equal(permutation_to(a, c), brute(a, c)) and solves[0] == 5
    assert digests[0] == 4 and len(MEMO) == 1  # both pairs hashed to look them up, (a, c) not stored


def test_prune_remembers_merges_only_for_its_verification(tmp_path, monkeypatch):
    """`prune` of an M-SMoE merge: without verification nothing is hashed or stored; with it the export stores
    every pair it aligns and the verification's reference finds each one (no second solve)."""
    from moeprune.calibration.run import CalibrateOptions
    from moeprune.merge.align_memo import MEMO
    from moeprune.pipeline.run import prune
    from moeprune.tiny import save_tiny
    from textgen import write_words

    model = save_tiny("qwen3_moe", tmp_path / "m", with_tokenizer=True)
    write_words(tmp_path / "web.txt", 3000, seed=0)
    calib = CalibrateOptions((f"web={tmp_path / 'web.txt'}",), samples=8, seq_len=32)
    recipe = [{"method": "msmoe", "ratio": 0.5}]
    solves, digests = counted_solves(monkeypatch), counted_digests(monkeypatch)
    prune(model, tmp_path / "a", recipe, calib=calib, run_verify=False)
    pairs = solves[0]
    assert pairs > 0 and digests[0] == 0 and len(MEMO) == 0
    _, result = prune(model, tmp_path / "b", recipe, calib=calib, run_verify=True)
    assert result.passed and solves[0] == 2 * pairs and MEMO.hits == pairs and len(MEMO) == pairs


def test_a_fused_last_pass_without_verification_hashes_nothing(tmp_path, monkeypatch):
    """M-SMoE → compress layer by layer: the compress pass applies the merge and writes the export as it goes
    (fused), so without verification no alignment comes again: nothing is hashed or stored, and every pair is
    solved once. With verification the pass stores each pair and the reference finds it."""
    from moeprune.calibration.run import CalibrateOptions
    from moeprune.merge.align_memo import MEMO
    from moeprune.pipeline.run import prune
    from moeprune.tiny import save_tiny
    from textgen import write_words

    model = save_tiny("qwen3_moe", tmp_path / "m", with_tokenizer=True)
    write_words(tmp_path / "web.txt", 3000, seed=0)
    calib = CalibrateOptions((f"web={tmp_path / 'web.txt'}",), samples=8, seq_len=32)
    recipe = [{"method": "msmoe", "ratio": 0.5}, {"method": "compress", "rank": 2}]
    solves, digests = counted_solves(monkeypatch), counted_digests(monkeypatch)
    prune(model, tmp_path / "a", recipe, calib=calib, run_verify=False, lazy=True)
    pairs = solves[0]
    assert pairs > 0 and digests[0] == 0 and len(MEMO) == 0
    _, result = prune(model, tmp_path / "b", recipe, calib=calib, run_verify=True, lazy=True)
    assert result.passed and solves[0] == 2 * pairs and MEMO.hits == pairs and len(MEMO) == pairs
