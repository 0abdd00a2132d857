"""MC-SMoE compress (`merge/compress.py`, `stages/compress.py`): low rank + sparse against a direct numpy SVD and
threshold, and the stage's export against that reference applied by hand to the merge-only export."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import moeprune
from moeprune.calibration.run import CalibrateOptions
from moeprune.merge.compress import factorised_bytes, low_rank_sparse
from moeprune.tiny import save_tiny
from refusal import assert_refused
from textgen import write_words


def by_numpy(w: np.ndarray, rank: int, keep: int) -> np.ndarray:
    """SVD truncated to `rank`, plus the `keep` largest-magnitude residual entries."""
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    low = (u[:, :rank] * s[:rank]) @ vh[:rank]
    res = w - low
    idx = np.argsort(-np.abs(res), axis=None, kind="stable")[:keep]
    sparse = np.zeros(res.size)
    sparse[idx] = res.reshape(-1)[idx]
    return low + sparse.reshape(w.shape)


@pytest.mark.parametrize("shape", [(96, 200), (200, 96)])
def test_a_bf16_matrix_is_fitted_in_float32_to_the_float64_reference(shape):
    """A 16-bit W is fitted in float32 (`fit_dtype`): against the float64 numpy SVD + threshold of the same values,
    equal to float32 rounding (the residual's cut may differ only between entries equal to float32 rounding)."""
    g = torch.Generator().manual_seed(shape[0])
    w = (torch.randn(shape[0], 24, generator=g) @ torch.randn(24, shape[1], generator=g) * 0.1
         + torch.randn(*shape, generator=g)).to(torch.bfloat16)  # a decaying spectrum, as trained weights have
    low, sparse = low_rank_sparse(w, 8, 0.9)
    assert low.dtype == sparse.dtype == torch.float32
    want = by_numpy(w.double().numpy(), 8, math.ceil(round(0.1 * w.numel(), 6)))
    got = (low + sparse).double().numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("shape,rank,sparsity", [((12, 20), 3, 0.9), ((20, 12), 1, 0.5), ((8, 8), 8, 1.0)])
def test_one_round_is_svd_then_threshold(shape, rank, sparsity):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=torch.float64)
    low, sparse = low_rank_sparse(w, rank, sparsity, iterations=1)
    keep = math.ceil(round((1 - sparsity) * w.numel(), 6))
    assert np.allclose((low + sparse).numpy(), by_numpy(w.numpy(), rank, keep), atol=1e-10)
    assert int((sparse != 0).sum()) <= keep


def test_more_rounds_never_increase_the_error():
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w[2, 5] += 30  # a spike the sparse part should take, so the low-rank part can fit the rest
    errs = []
    for it in (1, 2, 5):
        low, sparse = low_rank_sparse(w, 2, 0.95, iterations=it)
        errs.append(float((w - low - sparse).norm()))
    assert errs[0] >= errs[1] >= errs[2] and errs[2] < errs[0]


def test_factorised_bytes_by_hand():
    # r(m + n) = 4·(16 + 32) = 192 values, 10 % of 512 = 52 (⌈51.2⌉) sparse values, 512 bits = 64 bytes of mask
    assert factorised_bytes((16, 32), 4, 0.9, 2) == (192 + 52) * 2 + 64


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("compress")
    write_words(root / "web.txt")
    save_tiny("qwen3_moe", root / "src", seed=4, with_tokenizer=True, num_experts_per_tok=2)
    return root


def calib(root) -> CalibrateOptions:
    return CalibrateOptions((f"web={root / 'web.txt'}",), samples=6, seq_len=48)


def test_export_is_the_merge_export_with_its_merged_experts_decomposed(root, tmp_path):
    merge = {"method": "msmoe", "ratio": 0.5}
    _, result = moeprune.prune(root / "src", tmp_path / "m", recipe=[merge], calib=calib(root))
    assert result.passed
    applied, result = moeprune.prune(root / "src", tmp_path / "c", recipe=[
        merge, {"method": "compress", "rank": 2, "sparsity": 0.8}], calib=calib(root))
    assert result.passed  # verify: stock reload == the reconstruction written into the original
    groups = json.loads((tmp_path / "m" / "moeprune_plans" / "1-merge.json").read_text())["groups"]
    merged, plain = load_file(tmp_path / "m" / "model.safetensors"), load_file(tmp_path / "c" / "model.safetensors")
    checked = 0
    sums: dict[tuple[str, str], list[float]] = {}  # (layer, role) -> [Σ‖W − ref‖², Σ‖W‖²] over decomposed experts
    for name, w in merged.items():
        if ".mlp.experts." not in name or not name.endswith(("gate_up_proj", "down_proj", "proj.weight")):
            assert torch.equal(plain[name], w), name
            continue
        layer = name.split(".layers.")[1].split(".")[0]
        fused = w.dim() == 3  # [E, out, in] (transformers 5 fused experts) or one expert's [out, in]
        mats = list(enumerate(w)) if fused else [(int(name.split(".experts.")[1].split(".")[0]), w)]
        for g, mat in mats:
            got = plain[name][g] if fused else plain[name]
            if len(groups[layer][g]) < 2:
                assert torch.equal(got, mat), (name, g)  # a singleton group is not decomposed
                continue
            parts = [mat] if not name.endswith("gate_up_proj") else list(mat.chunk(2, dim=0))
            want = [by_numpy(p.double().numpy(), 2, math.ceil(round(0.2 * p.numel(), 6))) for p in parts]
            assert np.allclose(got.double().numpy(), np.concatenate(want, axis=0), atol=1e-5), (name, g)
            base = name.removesuffix(".weight").split(".")[-1]  # gate_up_proj, gate_proj, up_proj or down_proj
            roles = ("gate", "up") if base == "gate_up_proj" else (base.split("_")[0],)
            for role, p, ref in zip(roles, parts, want, strict=True):
                acc = sums.setdefault((layer, role), [0.0, 0.0])
                acc[0] += float(np.square(p.double().numpy() - ref).sum())
                acc[1] += float(np.square(p.double().numpy()).sum())
            checked += 1
    assert checked > 0
    summary = applied.report["stages"][-1]["summary"]
    assert 0 < summary["factorised_bytes"] < summary["dense_bytes"]
    # the reported relative error per layer and role: sqrt(Σ‖W − L − S‖² / Σ‖W‖²), against the numpy reference
    for (layer, role), (num, den) in sums.items():
        got = summary["layers"][layer]["rel_error"][role]
        assert got == pytest.approx((num / den) ** 0.5, rel=1e-6), (layer, role)


@pytest.mark.parametrize("recipe,match", [
    ([{"method": "reap", "ratio": 0.5}, {"method": "compress", "rank": 2}], "right after a merge stage"),
    ([{"method": "msmoe", "ratio": 0.5}, {"method": "compress"}], "give the rank"),
    ([{"method": "msmoe", "ratio": 0.5}, {"method": "compress", "rank": 2, "sparsity": 1.5}], r"in \[0, 1\]"),
    ([{"method": "msmoe", "ratio": 0.5}, {"method": "compress", "rank": 2, "experts": "some"}], "merged or all"),
])
def test_refusals_before_any_work(root, tmp_path, no_work, recipe, match):
    assert_refused(lambda: moeprune.prune(root / "src", tmp_path / "out", recipe=recipe, calib=calib(root)),
                   match, inputs=[root / "src"], out=tmp_path / "out")


def test_threshold_keeps_the_largest_and_breaks_ties_by_index():
    """Against a stable sort by hand, on integers (many ties) and on random floats, bit for bit (a dropped negative
    entry is +0.0, not -0.0: the export's bytes)."""
    from moeprune.merge.compress import hard_threshold

    g = torch.Generator().manual_seed(11)
    for r in (torch.randint(-3, 4, (9, 13), generator=g).double(), torch.randn(7, 5, generator=g, dtype=torch.float64)):
        for keep in (0, 1, 5, 17, r.numel() - 1, r.numel()):
            order = sorted(range(r.numel()), key=lambda i: (-abs(float(r.view(-1)[i])), i))[:keep]
            want = torch.zeros(r.numel(), dtype=r.dtype)
            want[order] = r.view(-1)[order]
            got = hard_threshold(r, keep)
            assert torch.equal(got.view(torch.int64), want.view(r.shape).view(torch.int64)), keep  # bitwise: +0.0


@pytest.mark.parametrize("shape", [(30, 70), (70, 30)])
def test_low_rank_is_the_truncated_svd(shape):
    """Both sides of the Gram (m ≤ n and m > n) against numpy's SVD."""
    from moeprune.merge.compress import low_rank

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    u, s, vh = np.linalg.svd(w.numpy(), full_matrices=False)
    for rank in (1, 7, 29):
        assert np.allclose(low_rank(w, rank).numpy(), (u[:, :rank] * s[:rank]) @ vh[:rank], atol=1e-10), rank
