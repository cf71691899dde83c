#!/usr/bin/env bash
# The GPU benchmarks in one command on a CUDA machine, run from the repository root:
#   bash bench/gpu.sh
# Each benchmark prints its tables (logged to $OUT) and writes its results JSON into $OUT.
# Every step has its own time limit, so one slow step cannot eat the others' time and the whole stays under
# 10 minutes.
set -u
OUT=${OUT:-/tmp/bench-gpu}
mkdir -p "$OUT"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/torch.txt"
timeout 240 python bench/expert_forward.py --device cuda --repeats 10 --profile --out "$OUT" 2>&1 |
    tee "$OUT/expert_forward.log"
timeout 90 python bench/peers.py --device cuda --repeats 5 --out "$OUT" 2>&1 | tee "$OUT/peers.log"
timeout 200 python bench/train_throughput.py --device cuda --presets moepp-0.6b --steps 10 --warmup 3 \
    --out "$OUT" 2>&1 |
    tee "$OUT/train_throughput.log"
timeout 120 python -m pytest tests/test_document_mask.py -q -k cuda 2>&1 | tee "$OUT/document_mask_test.log"
timeout 200 python bench/document_mask.py --device cuda --pairs 5 --warmup 3 --out "$OUT" 2>&1 |
    tee "$OUT/document_mask.log"
