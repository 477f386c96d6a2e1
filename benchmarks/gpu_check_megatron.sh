#!/usr/bin/env bash
# The megatron backend's GPU checks, as run on the GPU machine (see README "Megatron backend").
#   bash benchmarks/gpu_check_megatron.sh tests|run|bench   (logs under ${OUT:-/tmp/plugrl-gpu-check})
set -u
OUT=${OUT:-/tmp/plugrl-gpu-check}
mkdir -p "$OUT"
python -c "import torch, megatron.core as m; print('torch', torch.__version__, 'megatron-core', m.__version__, torch.cuda.get_device_name(), 'x', torch.cuda.device_count())"
for part in "$@"; do
  case "$part" in
    tests)  timeout 300 python -m pytest -q -m gpu -p no:cacheprovider tests/test_megatron_gpu.py -rfs --tb=short > "$OUT/gpu_tests.txt" 2>&1; grep -a "^E  \|FAILED\|passed\|failed\|^SKIPPED" "$OUT/gpu_tests.txt" | tail -30 ;;
    run)    timeout 280 plugrl train --train-backend megatron --output-dir "$OUT/run" > "$OUT/run.log" 2>&1; echo "rc $?"
            grep -a "done in\|first eval\|Error\|error" "$OUT/run.log" | tail -5
            grep -a "^rollout 50 \|^rollout 99 " "$OUT/run.log" | sed 's/.*\(rollout [0-9]* |\)/\1/' | cut -c1-300 ;;
    bench)  timeout ${BENCH_TIMEOUT:-420} python benchmarks/train_throughput.py --model 4b --tokens 9216 --samples 8 --response 1024 --steps ${BENCH_STEPS:-3} --attention --profile 2>&1 | tail -45 | tee "$OUT/bench.txt" ;;
  esac
done
