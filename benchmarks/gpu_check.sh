#!/usr/bin/env bash
# The GPU checks of the run engine, as one script for a session that is lent a CUDA machine
# (device tool: run it from the repository root there; see docs/design.md for what it measures).
#   1. the device-axis tests (property suite, engine: CPU/CUDA agreement, evaluation on the device)
#   2. seconds per block of the default recipe on a random model of the default model's shapes
#      (30 blocks of 576 / 1536: the default GGUF itself is too large to carry) and on 2 blocks of
#      LLaMA-7B shapes (4096 / 11008), resident and offloaded
#   3. LQLinear forward at batch 1 on the GPU
#   4. the Triton kernels: tests/test_triton_kernels.py and tests/test_lqlinear.py compiled on the GPU (every
#      format × both paths × float16/bfloat16 at the GPU tiles, and every other kernel test on CUDA
#      tensors), benchmarks/kernel_speed.py (LLaMA-7B/70B layer shapes, batch
#      1/16/512, int4/3/2 g64 + rank 32, fused vs reference vs dense float16, bytes-read bound at this
#      card's measured copy bandwidth, named with the card at the top of kernels.md) and
#      decode tokens/s of a compressed random model of the default model's shapes against float16
# Needs lqframe importable (pip install --no-deps --no-build-isolation -e . on the machine).
set -uo pipefail
export PYTHONUNBUFFERED=1
# tests/conftest.py sets TRITON_INTERPRET=1 only where no CUDA GPU exists; unset, every step (tests and
# benchmarks) runs the compiled kernels
unset TRITON_INTERPRET
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

# 4. Triton kernels (compiled): tests, per-layer table, end-to-end decode. The cuda cases compile some 500
#    kernel variants (Triton caches them: a second run is much faster)
timeout 540 python3 -m pytest -q -p no:cacheprovider -rs tests/test_triton_kernels.py tests/test_lqlinear.py 2>&1 \
  | tail -25 | tee "$OUT/kernel_tests.txt"
timeout 400 python3 benchmarks/kernel_speed.py --device cuda > "$OUT/kernels.md" 2> "$OUT/kernels.err"
cat "$OUT/kernels.md"
python3 -c "import sys; sys.path.insert(0, '.'); from tests.tiny import tiny_llama_dir; \
tiny_llama_dir('$OUT/random-smol', layers=30, hidden=576, intermediate=1536, vocab=256)"
timeout 300 python3 -m lqframe.cli run recipes/gptq4-qera32.yaml --model "$OUT/random-smol" --output "$OUT/random-smol-q" \
  --device cuda --quiet --set data.seq_len=128 --set data.calibration_windows=4 --set data.evaluation_windows=2 \
  > /dev/null 2>&1
timeout 300 python3 benchmarks/kernel_speed.py --device cuda --generate "$OUT/random-smol-q" 2>&1 | tail -5 \
  | tee "$OUT/generate.md"

# 5. (SCALE=1) the 7B-shaped synthetic model streamed from disk through --device cuda: the default recipe
#    (GPTQ + QERA-exact) for as many blocks as 7 minutes allow — seconds per block — and the data-free
#    recipe end to end (writing the 13.5 GB model takes a few minutes; benchmarks/results/scale.md)
if [ "${SCALE:-0}" = 1 ]; then
  timeout 540 python3 benchmarks/scale.py big --shape 7b --recipe default --device cuda --time-limit 420 \
    --work "$OUT/scale" --out "$OUT/scale.jsonl" 2>&1 | tail -3
  timeout 540 python3 benchmarks/scale.py big --shape 7b --device cuda --work "$OUT/scale" --out "$OUT/scale.jsonl" \
    2>&1 | tail -3
  python3 benchmarks/scale.py --table --out "$OUT/scale.jsonl" | tee "$OUT/scale.md"
fi
