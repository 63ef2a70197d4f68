#!/usr/bin/env bash
# Issues 6 and 8 on a lent GPU in one call: the GPU tests, the benchmark table, the FSDP smoke run of the
# 1.1B shape (train, save sharded, resume), then the torch.compile rows.
#
# The device machine has torch, lightning and transformers but not hydra-core, omegaconf or antlr4.
# Once, in the checkout root on the session's machine, before the call:
#   echo /.whl/ >> .git/info/exclude
#   mkdir -p .whl && cp ../shared/gpu-wheels/*.whl .whl/
# Then the device tool (an H200: the 7B rows need about 115 GiB):
#   run(command="bash bench/run_gpu.sh", carry=[".whl"], timeout_s=600, kind="nvidia-h200")
# A rerun can pick steps, e.g. `bash bench/run_gpu.sh bench` (any of: tests bench fsdp compile).
#
# The whole script keeps within RUN_GPU_BUDGET_S (default 575 s, under the device tool's 600 s limit):
# each step has a cap (tests 80 s, bench 270 s, fsdp 170 s) and never runs past what is left, and the
# compile rows get the rest. The tables are rewritten under $OUT after every row, so a step cut short still
# leaves what it measured. Files back in $OUT: test_gpu.log, bench.{log,md,json}, fsdp.log, compile.{log,md,json}.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-${TMPDIR:-/tmp}/bench-out}
mkdir -p "$OUT"
steps=${*:-tests bench fsdp compile}
budget=${RUN_GPU_BUDGET_S:-575}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# Long windows allocate blocks of many sizes; expandable segments keep fragmentation from causing OOMs.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

if python3 -c "import hydra, omegaconf" 2>/dev/null; then
  export PYTHONPATH=$PWD
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "${TMPDIR:-/tmp}/site" .whl/*.whl \
    || { echo "run_gpu.sh: could not install .whl/*.whl (copy ../shared/gpu-wheels there and carry .whl)"; exit 2; }
  export PYTHONPATH="${TMPDIR:-/tmp}/site:$PWD"
fi

# Seconds a step may run: its cap, or what is left of the budget if that is less (0: not worth starting).
allowance() {
  local left=$((budget - SECONDS))
  local cap=${1:-$left}
  ((left < cap)) && cap=$left
  ((cap < 45)) && cap=0
  echo "$cap"
}

# FSDP2 through Lightning on one GPU with the 1.1B shape: 4 steps at its 2048-token window, a validation and
# sharded checkpoints (last and best, ~13 GB each with AdamW's state), then a resume from last.ckpt to step 6.
fsdp_smoke() {
  local run_dir=${TMPDIR:-/tmp}/fsdp-1.1b
  local common=(trainer=fsdp trainer.devices=1 model=tinyllama-1.1b stage=pretrain register_base=false
    optim.pretrain.batch_size=2 trainer.val_check_interval=4 trainer.limit_val_batches=1 trainer.log_every_n_steps=1
    trainer.checkpoint_every_n_steps=0 trainer.enable_progress_bar=false "run_dir=$run_dir")
  # A dry run off the GPU (the script's logic, a shrunk model) can append overrides, e.g. trainer.accelerator=cpu.
  read -r -a extra <<< "${FSDP_SMOKE_OVERRIDES:-}"
  common+=("${extra[@]}")
  rm -rf "$run_dir"
  # Sampled beside the runs (stderr too is kept off the pipe, so tee ends when the step does).
  timeout 600 nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/fsdp_gpu_mem.csv" 2>/dev/null &
  local sampler=$!
  local rc=0
  python3 train.py "${common[@]}" optim.pretrain.max_steps=4 || rc=$?
  ((rc == 0)) && { du -sh "$run_dir"/checkpoints/*.ckpt/ ; ls -la "$run_dir/checkpoints"; }
  ((rc == 0)) && { python3 train.py "${common[@]}" optim.pretrain.max_steps=6 "resume=$run_dir/checkpoints/last.ckpt" || rc=$?; }
  kill "$sampler" 2>/dev/null
  echo "fsdp: metrics.csv"; cat "$run_dir/logs/metrics.csv" 2>/dev/null
  echo "fsdp: most GPU memory in use (nvidia-smi, MiB): $(sort -n "$OUT/fsdp_gpu_mem.csv" | tail -n 1)"
  rm -rf "$run_dir"
  echo "fsdp: exit status $rc"
  return $rc
}

status=0
for step in $steps; do
  case $step in
    tests) cap=$(allowance 80) ;;
    bench) cap=$(allowance 270) ;;
    fsdp) cap=$(allowance 170) ;;
    compile) cap=$(allowance) ;;
    *) echo "run_gpu.sh: unknown step '$step' (tests, bench, fsdp, compile)"; status=2; continue ;;
  esac
  if ((cap == 0)); then
    echo "run_gpu.sh: step '$step' not started: ${SECONDS}s of the ${budget}s budget spent" | tee "$OUT/$step.skipped"
    status=1; continue
  fi
  echo "=================== $step (at ${SECONDS}s, up to ${cap}s)"
  case $step in
    tests)
      { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv
        python3 -c "import torch, transformers, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'lightning', lightning.__version__)"
        timeout -k 5 "$cap" python3 -m pytest -m gpu -q -rA -p no:cacheprovider tests/test_gpu.py
      } 2>&1 | tee "$OUT/test_gpu.log" || status=1 ;;
    bench)
      timeout -k 5 "$cap" python3 bench/gpu_train_throughput.py --budget-s $((cap - 70)) --md bench.md 2>&1 \
        | tee "$OUT/bench.log" || status=1 ;;
    fsdp)
      export -f fsdp_smoke
      timeout -k 5 "$cap" bash -c fsdp_smoke 2>&1 | tee "$OUT/fsdp.log" || status=1 ;;
    compile)
      timeout -k 5 "$cap" python3 bench/gpu_train_throughput.py --suite compile --budget-s $((cap - 40)) --md compile.md 2>&1 \
        | tee "$OUT/compile.log" || status=1 ;;
  esac
done

# The reply keeps the end of the output: finish with the test summary and the tables.
echo; echo "=================== summary"
grep -E "passed|failed|error|skipped|PASSED|FAILED|ERROR" "$OUT/test_gpu.log" 2>/dev/null | tail -n 12
grep -E "^fsdp:|done in|Error|error:" "$OUT/fsdp.log" 2>/dev/null | grep -v "metrics.csv" | tail -n 6
for table in bench.md compile.md; do
  [ -f "$OUT/$table" ] && { echo; cat "$OUT/$table"; }
done
exit $status
