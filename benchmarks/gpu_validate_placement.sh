#!/usr/bin/env bash
# Issue "placement": the megatron backend + the embedded engine on GPUS=2 or 4 GPUs, a Qwen3-0.6B-shaped
# random model, a few GRPO steps each; prints the step split and the memory each side leaves.
#   colocated: all GPUs train (TP 2 + SP; DP = GPUS/2), one engine per GPU; the trainer offloads while
#              the engines generate, the engines release weights + KV while it trains; saves every
#              2 rollouts (the trainer's state is written before it offloads).
#   decoupled: GPUS/2 train GPUs (TP = GPUS/2 + SP) + GPUS/2 rollout GPUs (one engine each).
#   GPUS=4 bash benchmarks/gpu_validate_placement.sh [rollouts]   (logs under ${OUT:-/tmp/plugrl-placement})
set -u
OUT=${OUT:-/tmp/plugrl-placement}; ROLLOUTS=${1:-4}; GPUS=${GPUS:-2}; HALF=$((GPUS / 2))
mkdir -p "$OUT"
python - "$OUT" > /dev/null <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from hf_engine_throughput import build
build("0.6b", Path(sys.argv[1]))  # writes $OUT/0.6b
PY
CKPT="$OUT/0.6b"
COMMON=(--recipe tiny-default --hf-checkpoint "$CKPT" --train-backend megatron --sft-warmup-steps 0 --eval-interval 0
        --num-rollout "$ROLLOUTS" --rollout-max-response-len 256 --use-dynamic-batch-size --max-tokens-per-gpu 9216
        --lr 1e-6 --recompute-granularity full --recompute-method uniform --recompute-num-layers 1)
DECOUPLED_TP=()
if (( HALF > 1 )); then DECOUPLED_TP=(--tensor-model-parallel-size "$HALF" --sequence-parallel); fi
timeout ${COLOCATED_TIMEOUT:-250} plugrl train "${COMMON[@]}" --colocate --actor-num-gpus-per-node "$GPUS" \
  --tensor-model-parallel-size 2 --sequence-parallel --save "$OUT/colocated/ckpt" --save-interval 2 \
  --output-dir "$OUT/colocated" > "$OUT/colocated.log" 2>&1; echo "colocated rc $?"
timeout ${DECOUPLED_TIMEOUT:-200} plugrl train "${COMMON[@]}" --actor-num-gpus-per-node "$HALF" "${DECOUPLED_TP[@]}" \
  --rollout-num-gpus "$HALF" --output-dir "$OUT/decoupled" > "$OUT/decoupled.log" 2>&1; echo "decoupled rc $?"
ls "$OUT/colocated/ckpt" 2>/dev/null | tr '\n' ' '; echo
python - "$OUT" <<'PY'
import json, statistics, sys
for name in ("colocated", "decoupled"):
    try:
        rows = [json.loads(line) for line in open(f"{sys.argv[1]}/{name}/metrics.jsonl")][1:]  # drop the warm-up step
    except OSError as exc:
        print(name, "no metrics:", exc); continue
    med = lambda k: statistics.median(r.get(k, 0.0) for r in rows)
    step, roll, train, sync = med("perf/step_time"), med("perf/rollout_time"), med("perf/train_time"), med("perf/weight_sync_time")
    offload, save = med("perf/offload_time"), max(r.get("perf/save_time", 0.0) for r in rows)
    other = step - roll - train - sync
    print(f"{name:<10} steps {len(rows)}  step {step:6.2f}s  rollout {roll:6.2f}s  train {train:6.2f}s  "
          f"sync {sync:5.3f}s  other {other:5.2f}s ({other / step:.1%}; offload/onload {offload:.2f}s, "
          f"trainer save {save:.2f}s when due)  trainer offload freed/left GiB "
          f"{med('train/offload_freed_gib'):.1f}/{med('train/offload_left_gib'):.2f}  engine left while "
          f"released GiB {med('perf/engine_released_left_gib'):.2f}")
PY
grep -ah "Error\|error:" "$OUT"/colocated.log "$OUT"/decoupled.log | grep -v Warning | tail -6
