"""The measured probe on a strided token subset (`--probe-tokens`): its sums equal a brute-force masked forward over
exactly those tokens, scaled by N/kept; the flag is refused where it cannot apply."""

from types import SimpleNamespace

import pytest
import torch

from moeprune.analysis.probe import MeasuredProbe, sample
from moeprune.models import get_adapter
from moeprune.models.masking import masked_experts
from moeprune.tiny import tiny_model


def test_sample_keeps_every_stride_th_row_and_weights_back_to_all():
    x, z = torch.arange(10.0)[:, None], -torch.arange(10.0)[:, None]
    xs, zs, w = sample(x, z, 4)  # stride ⌈10/4⌉ = 3: rows 0, 3, 6, 9
    assert xs[:, 0].tolist() == [0, 3, 6, 9] and zs[:, 0].tolist() == [0, -3, -6, -9] and w == 10 / 4
    assert sample(x, z, 0)[2] == 1.0 and sample(x, z, None)[0].shape[0] == 10 and sample(x, z, 10)[2] == 1.0


@pytest.mark.parametrize("cap", [None, 7])
def test_probe_error_equals_masked_block_on_the_sampled_tokens(cap):
    torch.manual_seed(0)
    model = tiny_model("qwen3_moe").eval()
    adapter = get_adapter(model.config, model=model)
    layer, H = adapter.moe_layers()[0], model.config.hidden_size
    block = adapter.block(model, layer)
    x = torch.randn(2, 9, H)  # [B, S, H]
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 6:] = False  # padding
    with torch.no_grad():
        z = block(x)
    z = z[0] if isinstance(z, tuple) else z

    io = SimpleNamespace(inputs=[x], outputs=[z], valid=[valid], tags=["web"])  # BlockIO's fields

    probe = MeasuredProbe([0.25], adapter.routing(), max_tokens=cap)

    stats = SimpleNamespace(sums={"gate_norm_sum": torch.arange(adapter.num_experts, dtype=torch.float64) + 1})
    assert probe(model, adapter, layer, {"web": stats}, io) == []
    dropped = probe.dropped[layer][0]
    real_x, real_z = x[valid], z[valid]  # [15, H]
    n = real_x.shape[0]
    keep = torch.arange(n) if cap is None else torch.arange(0, n, -(-n // cap))  # brute-force stride
    with torch.no_grad(), masked_experts(model, adapter, {layer: dropped}):
        out = block(real_x[keep][None])
    out = (out[0] if isinstance(out, tuple) else out)[0]
    scale = n / keep.numel()
    err = float((real_z[keep].double() - out.double()).square().sum()) * scale
    ref = float(real_z[keep].double().square().sum()) * scale
    got_err, got_ref = probe.errors[layer]["web"][0]
    # the probe runs the block on the re-routed tokens only: float32 rounding of a smaller batch, not 1e-9
    assert got_err == pytest.approx(err, rel=1e-6) and got_ref == pytest.approx(ref, rel=1e-9)
    assert probe.measured(layer) == [pytest.approx(err / ref, rel=1e-6)]


def test_probe_tokens_refused_with_a_stats_file_and_when_negative(tmp_path, capsys):
    from moeprune.cli import main

    assert main(["analyze", "--stats", str(tmp_path / "s.safetensors"), "--out", str(tmp_path / "o"),
                 "--probe-tokens", "64"]) == 2
    assert "--probe-tokens sets the measured probe" in capsys.readouterr().err
    (tmp_path / "w.txt").write_text("some text")
    assert main(["analyze", str(tmp_path / "m"), "--calib", f"web={tmp_path / 'w.txt'}", "--out", str(tmp_path / "o"),
                 "--probe-tokens", "-1"]) == 2
    assert "--probe-tokens -1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
