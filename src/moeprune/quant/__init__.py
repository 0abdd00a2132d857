"""Weight-only integer quantization of MoE experts, stored in the compressed-tensors format, and mixed precision.

    scheme.py       `QuantScheme` (bits, group size, symmetric, parts) and the scheme names (w8a16, w4a16, ...)
    rtn.py          round to nearest with compressed-tensors' own scale / rounding formula; `fake_quantize`
    gptq.py         GPTQ for one weight matrix from its Hessian (lazy batch updates, group scales, act order)
    hessian.py      per-expert Hessians from the tokens routed to each expert, one decoder layer at a time
    run.py          quantize a model layer by layer (RTN, or GPTQ with RTN fallbacks), returning a `QuantPlan`
    plan.py         `QuantPlan`: integer weights and scales per quantized tensor (JSON + safetensors)
    export.py       the saved folder rewritten as a compressed-tensors checkpoint (compressed-tensors' compressors)
    load.py         a compressed-tensors checkpoint decompressed module by module (per-layer mixed expert widths)
    sizes.py        bytes of an expert as compressed-tensors stores it, per width
    model_sizes.py  a checkpoint's bytes split into fixed parts, router rows and experts (headers only)
    importance.py   loss tables per expert and width (PMQ, CAMERA-Q)
    allocate.py     bits per expert / per layer from an integer linear program (scipy.optimize.milp)
    search.py, budget.py  `moeprune budget`: removal x neurons x bits for the least predicted loss at a size
See docs/quantization.md.
"""
