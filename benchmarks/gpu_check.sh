#!/usr/bin/env bash
# Every check that needs a CUDA machine, in one call (the device tool lends ~15 minutes a task):
#
#   bash benchmarks/gpu_check.sh          # logs and JSON land in $OUT (or /tmp/gpu_check)
#
# 1. the CUDA-only tests (pinned host slots, copy-stream ordering, offloaded-on-GPU tokens equal
#    to the CPU's within the GPU budget, no device-wide synchronize, hybrid miss handling equal
#    to a replay of its placements) and the O_DIRECT tests;
# 2. the GPU benchmark: Mixtral 8x7B shapes, 6 of 32 layers (17 GB on local disk), a 12 GiB
#    device budget, pinned host tier of 48 GiB; bf16 and int8 experts, each with --hybrid off
#    and auto.
# Each step has its own time limit (570 s in all, inside the 600 s of one call) so a hang cannot
# eat the lease. It installs nothing: the device image has torch, transformers, safetensors,
# accelerate, psutil, sentencepiece and pytest.
set -uo pipefail
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
$py -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" \
    | tee "$out/env.txt"
timeout 120 $py -m pytest -q -rs tests/test_cuda_engine.py tests/test_hybrid.py \
    tests/test_direct_io.py 2>&1 \
    | tee "$out/cuda_tests.log"
model=${GPU_CHECK_MODEL:-/tmp/m8x7b}
timeout 150 $py benchmarks/make_checkpoint.py mixtral-8x7b --out "$model" --layers 6 \
    > "$out/make_checkpoint.json" || echo "make_checkpoint failed or timed out" >&2
timeout 300 $py benchmarks/gpu_bench.py "$model" --gpu-memory 12GiB --cpu-memory 48GiB \
    --experts float,int8 --hybrid off,auto > "$out/gpu_bench.json" 2> "$out/gpu_bench.err"
echo "gpu_bench exit $?"; tail -c 2000 "$out/gpu_bench.json"
