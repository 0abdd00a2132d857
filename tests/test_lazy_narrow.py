"""Which parameters a lazy layer may build in their narrow stored dtype (`io/lazy_narrow.py`): only where the result
is the same bits as reading them wide. The end-to-end equality with from_pretrained(float32) on every family is in
`test_lazy.py::test_materialised_layers_equal_eager[*-bf16-read-as-f32]`."""

from __future__ import annotations

from types import SimpleNamespace as NS

import torch

from moeprune.io.lazy_narrow import copies_only, narrow_params


class Concatenate:  # named like transformers' copy-only ops; the rule goes by the op's class name
    pass


class MergeModulelist:
    pass


class Fp8Dequantize:  # arithmetic
    pass


def meta(dtype):
    return torch.empty(4, 4, dtype=dtype, device="meta")


def test_converters_that_only_move_values():
    assert copies_only(None)  # a plain rename
    assert copies_only(NS(operations=[MergeModulelist(), Concatenate()]))
    assert not copies_only(NS(operations=[Fp8Dequantize(), MergeModulelist()]))


def test_rules():
    params = {"wide": meta(torch.float32), "mixed": meta(torch.float32), "f32_on_disk": meta(torch.float32),
              "same_width": meta(torch.bfloat16), "arith": meta(torch.float32), "f16": meta(torch.float32),
              "int": torch.empty(4, dtype=torch.int64, device="meta")}
    feeds = {"wide": [NS(dtype="BF16")] * 3, "mixed": [NS(dtype="BF16"), NS(dtype="F32")],
             "f32_on_disk": [NS(dtype="F32")], "same_width": [NS(dtype="BF16")], "arith": [NS(dtype="BF16")],
             "f16": [NS(dtype="F16")], "int": [NS(dtype="I64")], "absent": [NS(dtype="BF16")]}
    copy = dict.fromkeys(feeds, True) | {"arith": False}
    assert narrow_params(params, feeds, copy, quantized=False) == {"wide": torch.bfloat16, "f16": torch.float16}
    assert narrow_params(params, feeds, copy, quantized=True) == {}
