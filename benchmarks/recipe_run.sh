#!/usr/bin/env bash
# Issue "the default Qwen3-4B run on one 8-GPU machine": slime's recipe (`--recipe qwen3-4b-8xh100`) on a
# locally built Qwen3-4B-shaped checkpoint (random weights) with the embedded `hf` engine standing in for
# SGLang (which cannot run on the GPU machines). The guide's steps: convert the checkpoint to torch_dist
# (the reference model's `--ref-load`), then run
#   colocated-tp2   the recipe as it is: all GPUs train (TP 2 + SP) and generate, both sides offloaded
#   colocated-tp1   the same with TP 1 (DP = GPUs)
#   decoupled-tp2   `qwen3-4b-8xh100-decoupled`: 2 train GPUs (TP 2) + the rest generate
# each for a few GRPO rollouts, and prints benchmarks/recipe_report.py's table (step split, train tokens/s
# per GPU and MFU, weight-sync seconds, peak memory per GPU sampled with nvidia-smi).
#
#   GPUS=8 bash benchmarks/recipe_run.sh [rollouts]        logs and runs under ${OUT:-/tmp/plugrl-recipe}
#   RUNS="colocated-tp2" RESPONSE=512 GPUS=4 bash benchmarks/recipe_run.sh 3
#   MODEL=tiny DRY_RUN=1 bash benchmarks/recipe_run.sh     every command's config and plan, no GPU (a test)
#   EXTRA="--attention-backend auto" ...                  more flags for every run (word-split)
#   ENGINE=serve ...     the recipe's own `sglang` rollout backend with `plugrl serve` engines (one per GPU)
#                        behind the real sglang_router (needs `sglang_router` importable, e.g. from the
#                        device kit's optional use-router.sh), instead of the embedded engine pool
# Changed from the recipe: the hf engine (1 GPU per engine), --rollout-max-response-len $RESPONSE
# (default 1024: random weights never stop, so every sample runs to the limit), no eval, no saves.
set -u
OUT=${OUT:-/tmp/plugrl-recipe}; ROLLOUTS=${1:-3}; GPUS=${GPUS:-8}; MODEL=${MODEL:-4b}; RESPONSE=${RESPONSE:-1024}
RUNS=${RUNS:-colocated-tp2 colocated-tp1 decoupled-tp2}; RUN_TIMEOUT=${RUN_TIMEOUT:-900}
DRY=(); if [[ -n "${DRY_RUN:-}" ]]; then DRY=(--dry-run); fi
mkdir -p "$OUT"
CKPT=$(python - "$OUT" "$MODEL" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from hf_engine_throughput import build
root, shape = Path(sys.argv[1]), sys.argv[2]
print(root / shape if (root / shape / "config.json").exists() else build(shape, root))
PY
)
CKPT=$(tail -n 1 <<< "$CKPT")  # the tokenizer build prints blank lines before the path
[[ -f "$CKPT/config.json" ]] || { echo "building the $MODEL checkpoint failed"; exit 1; }
read -r PROMPTS EVALS <<< "$(python -c 'from plugrl.plugins.backends.tiny_default import TRAIN_FILE as t, EVAL_FILE as e; print(t, e)')"
DIST="$OUT/${MODEL}_torch_dist"
if [[ ! -f "$OUT/.${MODEL}_torch_dist.done" ]]; then
  start=$(date +%s)
  plugrl convert hf-to-megatron --hf-checkpoint "$CKPT" --save "$DIST" > "$OUT/convert.log" 2>&1 \
    || { echo "convert failed, see $OUT/convert.log"; tail -5 "$OUT/convert.log"; exit 1; }
  touch "$OUT/.${MODEL}_torch_dist.done"; echo "convert hf-to-megatron: $(( $(date +%s) - start )) s"
fi
COMMON=(--hf-checkpoint "$CKPT" --ref-load "$DIST" --prompt-data "$PROMPTS" --eval-prompt-data toy "$EVALS"
        --eval-interval 0 --save "" --load "" --rollout-num-gpus-per-engine 1 --num-rollout "$ROLLOUTS"
        --rollout-max-response-len "$RESPONSE")
if [[ "${ENGINE:-hf}" == serve ]]; then  # the sglang backend's own launch path, with plugrl serve as the engine
  export PLUGRL_SGLANG_LAUNCH_COMMAND="python -m plugrl.plugins.backends.sglang.server"
else
  COMMON+=(--rollout-backend hf)
fi
status=0
for run in $RUNS; do
  case "$run" in
    colocated-tp2) flags=(--recipe qwen3-4b-8xh100 --actor-num-gpus-per-node "$GPUS") ;;
    colocated-tp1) flags=(--recipe qwen3-4b-8xh100 --actor-num-gpus-per-node "$GPUS" --tensor-model-parallel-size 1
                          --no-sequence-parallel) ;;
    decoupled-tp2) flags=(--recipe qwen3-4b-8xh100-decoupled --actor-num-gpus-per-node 2 --rollout-num-gpus $((GPUS - 2))) ;;
    *) echo "unknown run $run (known: colocated-tp2 colocated-tp1 decoupled-tp2)"; exit 2 ;;
  esac
  mkdir -p "$OUT/$run"
  sampler=""
  if [[ -z "${DRY_RUN:-}" ]] && command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader -l 1 > "$OUT/$run/smi.csv" 2>&1 &
    sampler=$!
  fi
  # shellcheck disable=SC2086  # EXTRA is a word list
  timeout "$RUN_TIMEOUT" plugrl train "${flags[@]}" "${COMMON[@]}" ${EXTRA:-} --output-dir "$OUT/$run" "${DRY[@]}" \
    > "$OUT/$run.log" 2>&1
  rc=$?
  if [[ -n "$sampler" ]]; then kill "$sampler" 2> /dev/null; fi
  echo "$run rc $rc"
  if [[ -n "${DRY_RUN:-}" ]]; then grep -a "^# \(train\|rollout\|placement\|ready\|recipe values\)" "$OUT/$run.log"; fi
  if (( rc != 0 )); then status=1; grep -a "Error\|error:" "$OUT/$run.log" | grep -v Warning | tail -4; fi
done
if [[ -z "${DRY_RUN:-}" ]]; then
  # shellcheck disable=SC2086  # RUNS is a word list
  python benchmarks/recipe_report.py $(for run in $RUNS; do echo "$OUT/$run"; done) || status=1
fi
exit $status
