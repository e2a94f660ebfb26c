#!/usr/bin/env bash
# The GPU checks of the run engine, as one script for a session that is lent a CUDA machine
# (device tool: run it from the repository root there; see docs/design.md for what it measures).
#   1. the device-axis tests (property suite, engine: CPU/CUDA agreement, evaluation on the device)
#   2. seconds per block of the default recipe on a random model of the default model's shapes
#      (30 blocks of 576 / 1536: the default GGUF itself is too large to carry) and on 2 blocks of
#      LLaMA-7B shapes (4096 / 11008), resident and offloaded
#   3. LQLinear forward at batch 1 on the GPU
# Needs lqframe importable (pip install --no-deps --no-build-isolation -e . on the machine).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/device.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_properties.py -k "cuda or CUDA or device" \
  2>&1 | tail -25 | tee "$OUT/tests.txt"
python3 benchmarks/llama_blocks.py --device cuda --blocks 30 --hidden 576 --intermediate 1536 --heads 9 \
  > "$OUT/default_shapes.json" 2>/dev/null
python3 benchmarks/llama_blocks.py --device cuda > "$OUT/llama7b_2blocks.json" 2>/dev/null
python3 benchmarks/llama_blocks.py --device cuda --offload > "$OUT/llama7b_2blocks_offload.json" 2>/dev/null
python3 benchmarks/lqlinear_forward.py --device cuda --repeats 50 > "$OUT/lqlinear_forward.md" 2>&1
grep -h '"seconds_per_block"\|"peak_device_mb"' "$OUT"/*.json
cat "$OUT/lqlinear_forward.md"
