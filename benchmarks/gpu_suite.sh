#!/usr/bin/env bash
# The GPU suite on one GPU machine within a time budget: the `pytest -m gpu` files in parallel lanes
# (they share the GPU: each lane's models are small, except the 4B recipe, which runs only with
# RECIPE=1 and on its own), then the benchmarks the GPU issues are measured with.
#
#   bash benchmarks/gpu_suite.sh tests     # the GPU tests, lanes in parallel; a table of lane results
#   bash benchmarks/gpu_suite.sh engine    # the engine vs generate at the 4B shape, one row set per decode
#                                          # attention (ATTENTION) and compile_decode (COMPILE) value
#   bash benchmarks/gpu_suite.sh train     # one train step at the 4B shape: transformers+Liger vs the torch backend (and without its grad cache)
#                                          # (PROFILE=1: with every row's kernel profile)
#   bash benchmarks/gpu_suite.sh megatron4b  # the megatron backend's 4B rows of issue 17 (more of them on an H200)
#   RECIPE=1 bash benchmarks/gpu_suite.sh recipe   # the 4B recipe test (H200 + 128 GiB host RAM)
#
# DEADLINE (seconds, default 540) bounds the whole call: lanes still running then are stopped and
# reported as such. Logs go to $OUT (default ./gpu-suite-logs), one file per lane or benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
phase=${1:-tests}
OUT=${OUT:-./gpu-suite-logs}
mkdir -p "$OUT"
DEADLINE=${DEADLINE:-540}
MODELS=${MODELS:-/tmp/plugrl-models}  # the random 4B checkpoint, built once per machine by the first benchmark
start=$(date +%s)
left() { echo $((DEADLINE - ($(date +%s) - start))); }

# The lanes and their pytest arguments; the default-command and resume tests are the longest (~2 min
# each on an H100), so they get lanes of their own.
LANE_NAMES=(default_command gpu_path_rest megatron engine torch_backend weights)
lane_args() {
  case $1 in
    default_command) echo "tests/test_gpu_path.py -k default_command" ;;
    gpu_path_rest) echo "tests/test_gpu_path.py -k 'not default_command and not 4b_recipe'" ;;
    megatron) echo "tests/test_megatron_gpu.py tests/test_wgrad_accumulation.py" ;;
    engine) echo "tests/test_hf_fast_decode.py tests/test_decode_attention.py tests/test_hf_engine.py tests/test_fused_decode_ops.py" ;;
    torch_backend) echo "tests/test_fused_log_probs.py tests/test_torch_backend_gpu.py tests/test_packed_attention_gpu.py tests/test_host_sync_gpu.py" ;;
    weights) echo "tests/test_gpu_offload.py tests/test_weight_sync_gpu.py tests/test_sglang_weights_ipc.py" ;;
  esac
}

run_lanes() {
  local pids=() name
  for name in "${LANE_NAMES[@]}"; do
    eval "timeout $(left) python -m pytest -q -m gpu -p no:cacheprovider $(lane_args "$name")" >"$OUT/$name.log" 2>&1 &
    pids+=($!)
  done
  printf '%-16s %4s %6s  %s\n' lane rc secs "pytest summary"
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    rc=$?
    name=${LANE_NAMES[$i]}
    summary=$(grep -E "(passed|failed|error|skipped|no tests ran)" "$OUT/$name.log" | tail -1)
    [[ $rc -eq 124 ]] && summary="stopped at the deadline; $summary"
    printf '%-16s %4s %6s  %s\n' "$name" "$rc" "$(($(date +%s) - start))" "$summary"
  done
}

# Run "$@" under what is left of the deadline; refuse to start when nothing is (timeout 0 means no limit).
bounded() {
  local budget
  budget=$(left)
  if (( budget <= 0 )); then echo "no time left before the deadline: not started: $*" >&2; return 124; fi
  timeout "$budget" "$@"
}

case "$phase" in
  tests)
    run_lanes
    ;;
  recipe)
    [[ "${RECIPE:-0}" == 1 ]] || { echo "the 4B recipe test needs RECIPE=1 (one H200, 128 GiB host RAM)"; exit 2; }
    # the run's directories stay under BASETEMP (the 4B checkpoints are ~25 GB); its metrics, config and
    # log are copied to $OUT and turned into the step table
    basetemp=${BASETEMP:-/tmp/plugrl-recipe-test}
    bounded python -m pytest -q -m gpu -p no:cacheprovider --basetemp="$basetemp" tests/test_gpu_path.py \
      -k 4b_recipe >"$OUT/recipe.log" 2>&1
    echo "recipe rc=$?: $(tail -1 "$OUT/recipe.log")"
    run_dir=$(dirname "$(find "$basetemp" -path '*/run/metrics.jsonl' | head -1)")
    if [[ -d "$run_dir" ]]; then
      mkdir -p "$OUT/recipe-run"
      cp "$run_dir"/metrics.jsonl "$run_dir"/config.yaml "$OUT/recipe-run/" 2>/dev/null
      cp "$(dirname "$run_dir")"/train.log "$OUT/recipe-run/" 2>/dev/null
      python benchmarks/recipe_report.py "$run_dir" 2>&1 | tail -4
      python - "$run_dir/metrics.jsonl" <<'PY'
import json, sys
keys = ["perf/step_time", "perf/generate_time", "perf/train_time", "perf/train_log_probs_time", "perf/train_update_time",
        "perf/weight_sync_time", "perf/offload_time",
        "perf/engine_generated_tokens", "perf/engine_decode_steps", "perf/engine_prefill_s",
        "perf/engine_decode_launch_s", "perf/engine_decode_wait_s", "perf/engine_decode_host_s",
        "train/train_rollout_logprob_abs_diff", "perf/host_mem_peak_gib", "perf/host_mem_plan_gib"]
for line in open(sys.argv[1]):
    row = json.loads(line)
    if row.get("phase") == "train":
        print(f"rollout {row['rollout_id']}: " + ", ".join(f"{k.split('/')[1]} {row[k]:.3f}" for k in keys if k in row))
PY
    fi
    ;;
  engine)
    # one engine per decode attention, each against the same generate baseline
    (cd benchmarks && bounded python hf_engine_throughput.py --model 4b --batch-sizes 64,256 --prompt-len 256 \
      --new-tokens 256 --compare-generate --decode-attention "${ATTENTION:-sdpa,matmul}" \
      --compile-decode "${COMPILE:-on,off}" --profile --top 15) \
      >"$OUT/engine.log" 2>&1
    echo "engine benchmark rc=$?"
    grep -E "^(model=| *attention| *(sdpa|matmul|flash)(/ops-o[nf]+)? )" "$OUT/engine.log"
    ;;
  train)
    # PROFILE=1 adds every row's kernel profile (the baselines' too), each top kernel with the ops and lines that launched it
    (cd benchmarks && bounded python train_throughput.py --model 4b --steps 3 --checkpoint-cache "$MODELS" \
      --backends "${BACKENDS:-transformers+liger,torch,torch-no-grad-cache}" $([[ ${PROFILE:-0} == 1 ]] && echo --profile --profile-origins --top 30)) \
      >"$OUT/train.log" 2>&1
    echo "train benchmark rc=$?"
    grep -E "(s/step|tok/s|vs |^\|)" "$OUT/train.log" | tail -12
    ;;
  megatron4b)
    # issue 17's megatron rows at the 4B shape (sequences of 1,152 tokens; each row says how a step is split):
    # - no recompute over 8 micro-batches of one sequence (peak ~73 GiB: fits an 80 GB card), with the weight
    #   gradients accumulated by the GEMMs (the default) and without
    # - full recompute over 15 micro-batches of 9,216 tokens per optimizer step, the split the recipe's loop
    #   trains with (its in-loop update MFU compares with this row)
    # - on a card of > 100 GB (H200) also no recompute over one 9,216-token micro-batch (~114 GiB), with the
    #   _foreach grad ops and with megatron-core's local ones
    # - on two GPUs also DP 2, without and with --overlap-grad-reduce (issue 17: >= 1.85x one GPU's tokens/s)
    : >"$OUT/megatron4b.log"  # this call's rows only
    rows=("--megatron-recompute none --tokens 1152 --samples 1 --micro-batches 8"
          "--megatron-recompute none --tokens 1152 --samples 1 --micro-batches 8 --megatron-no-wgrad-fusion"
          "--micro-batches 15 --steps 2")
    gpu_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
    if (( gpu_mib > 100000 )); then
      rows+=("--megatron-recompute none" "--megatron-recompute none --megatron-local-grad-ops")
    fi
    # two GPUs: TP 1 x DP 2 against one GPU at the same per-rank work (4 micro-batches of 9,216 tokens per
    # rank and step), the gradient reduction after the backward and overlapped with it (--overlap-grad-reduce)
    if (( $(nvidia-smi -L | wc -l) >= 2 )); then
      rows+=("--micro-batches 4 --steps 2" "--micro-batches 4 --steps 2 --megatron-dp 2"
             "--micro-batches 4 --steps 2 --megatron-dp 2 --megatron-overlap-grad-reduce")
    fi
    for row in "${rows[@]}"; do
      (cd benchmarks && bounded python train_throughput.py --model 4b --steps 3 --checkpoint-cache "$MODELS" \
        --backends megatron $row) >>"$OUT/megatron4b.log" 2>&1
      echo "megatron $row: rc=$?"
    done
    grep -E "^(megatron|device)|weights" "$OUT/megatron4b.log"
    ;;
  *)
    echo "usage: bash benchmarks/gpu_suite.sh tests|engine|train|megatron4b|recipe" >&2
    exit 2
    ;;
esac
