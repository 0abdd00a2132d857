#!/usr/bin/env bash
# One-GPU check of moeprune (see benchmarks/gpu_check.py for what is measured). Usage: benchmarks/gpu_check.sh OUT
# Runs in at most 8 minutes (hard timeout; the script budgets itself to GPU_CHECK_BUDGET_S=460 s and skips the vllm
# section's remaining exports past it); writes OUT/gpu_check.md and OUT/gpu_check.json. CI never runs it.
# GPU_CHECK_ONLY=prune,quant,vllm runs the sections named (the vllm section serves what prune and quant export, and
# builds a small testbed itself). A dry run on a CPU machine: GPU_CHECK_DEVICE=cpu GPU_CHECK_SMALL=1.
# vLLM and lm-eval must already be importable on the machine (it has no network); without vLLM the vllm section
# says so and runs its checks with transformers bf16 standing in.
# Wheels in .whl/ (e.g. the transformers release this checkout is tested with) are installed to a private
# folder first, for machines without network access.
set -uo pipefail
OUT=${1:-gpu_check_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
    .whl/*.whl && export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/nvidia-smi.txt"
timeout 480 python3 benchmarks/gpu_check.py "$OUT" 2>&1 | tee "$OUT/gpu_check.log"
