#!/usr/bin/env bash
# One device call (under its 10-minute limit) for everything a GPU session checks besides the training
# harness (bench_train.py has its own calls): the CUDA-only tests (bf16 kernels, CUDA packing, varlen
# attention, offloaded checkpointing), then the fused-loss, QLoRA-layer and packing-assembly benchmarks.
# Run from the project root on the GPU machine, carrying .whl (benchmarks/README.md):
#     bash benchmarks/gpu_checks.sh
# Results and logs land in $OUT; commit the JSON files under benchmarks/results/.
set -u
out=${OUT:-/tmp/gpu-checks}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log, say how it ended
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "$name: exit $? after $((SECONDS - t0)) s"
    tail -n 3 "$out/$name.log"
}

step cuda-tests 200 python3 -m pytest -q -p no:cacheprovider -x tests/kernels tests/model tests/test_loss.py \
    tests/test_packing_cuda.py
step fused-ce 150 python3 benchmarks/bench_fused_linear_cross_entropy.py --out "$out/fused-ce.json"
step qlora-layer 120 python3 benchmarks/bench_qlora_layer.py --out "$out/qlora-layer.json"
step packing-cuda 45 python3 benchmarks/bench_packing_cuda.py --out "$out/packing-assembly.json"
