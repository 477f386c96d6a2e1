#!/usr/bin/env bash
# Issue "placement": the megatron backend + the embedded engine on 2 GPUs, colocated (TP 2 + SP on
# both GPUs, engine on GPU 0, trainer offloaded while generating) and decoupled (1 train GPU + 1
# rollout GPU), a Qwen3-0.6B-shaped random model, a few GRPO steps each; prints the step split.
#   bash benchmarks/gpu_validate_placement.sh [rollouts]   (logs under ${OUT:-/tmp/plugrl-placement})
set -u
OUT=${OUT:-/tmp/plugrl-placement}; ROLLOUTS=${1:-4}
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
timeout ${COLOCATED_TIMEOUT:-250} plugrl train "${COMMON[@]}" --colocate --actor-num-gpus-per-node 2 --tensor-model-parallel-size 2 \
  --sequence-parallel --output-dir "$OUT/colocated" > "$OUT/colocated.log" 2>&1; echo "colocated rc $?"
timeout ${DECOUPLED_TIMEOUT:-200} plugrl train "${COMMON[@]}" --actor-num-gpus-per-node 1 --rollout-num-gpus 1 \
  --output-dir "$OUT/decoupled" > "$OUT/decoupled.log" 2>&1; echo "decoupled rc $?"
python - "$OUT" <<'PY'
import json, statistics, sys
for name in ("colocated", "decoupled"):
    try:
        rows = [json.loads(line) for line in open(f"{sys.argv[1]}/{name}/metrics.jsonl")][1:]  # drop the warm-up step
    except OSError as exc:
        print(name, "no metrics:", exc); continue
    med = lambda k: statistics.median(r.get(k, 0.0) for r in rows)
    step, roll, train, sync = med("perf/step_time"), med("perf/rollout_time"), med("perf/train_time"), med("perf/weight_sync_time")
    other = step - roll - train - sync
    print(f"{name:<10} steps {len(rows)}  step {step:6.2f}s  rollout {roll:6.2f}s  train {train:6.2f}s  "
          f"sync {sync:5.3f}s  other {other:5.2f}s ({other / step:.1%})  train tok/step "
          f"{med('train/tokens') if 'train/tokens' in rows[-1] else 'n/a'}  offload freed/left GiB "
          f"{med('train/offload_freed_gib'):.1f}/{med('train/offload_left_gib'):.2f}")
PY
grep -ah "Error\|error:" "$OUT"/colocated.log "$OUT"/decoupled.log | grep -v Warning | tail -6
