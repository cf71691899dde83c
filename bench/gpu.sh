#!/usr/bin/env bash
# The GPU checks and measurements in one call, under 8 minutes in all (the per-part limits below sum to 420 s):
#   bash bench/gpu.sh
# 1. the CUDA test suite (pytest -m cuda: grouped-GEMM experts, bf16 training, train.compile, host syncs, memory);
# 2. expert forward at the paper's shapes for every tau, the vanilla layer against its peers, training throughput
#    and MFU of moepp-0.6b and its vanilla twin, document masking.
# Each benchmark prints its tables (logged to $OUT/NAME.log) and writes its results JSON into $OUT. Every part has
# its own hard time limit so one slow part cannot eat the others'.
set -u
OUT=${OUT:-/tmp/bench-gpu}
mkdir -p "$OUT"
part() {  # part NAME SECONDS COMMAND...: run with a hard limit, log to $OUT/NAME.log, record the exit status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout --kill-after=5 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
    tail -n 5 "$OUT/$name.log"
}
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/torch.txt"
part cuda_tests 110 python -m pytest -m cuda -q -rs --junitxml="$OUT/cuda_tests.xml"
part expert_forward 80 python bench/expert_forward.py --device cuda --repeats 5 --profile --out "$OUT"
part peers 40 python bench/peers.py --device cuda --repeats 5 --out "$OUT"
part train_throughput 120 python bench/train_throughput.py --device cuda --presets moepp-0.6b moe-0.6b --steps 5 \
    --warmup 2 --out "$OUT"
part document_mask_test 25 python -m pytest tests/test_document_mask.py -q -k cuda
part document_mask 45 python bench/document_mask.py --device cuda --pairs 5 --warmup 3 --out "$OUT"
