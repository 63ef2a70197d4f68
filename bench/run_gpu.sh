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
# A rerun can pick steps, e.g. `bash bench/run_gpu.sh bench` (any of: tests bench fsdp compile reproduce ops),
# move the caps (RUN_GPU_CAPS="bench=320 fsdp=150") and pass the benchmark arguments
# (RUN_GPU_BENCH_ARGS="--windows 131072").
#
# Issue 7 needs calls of its own (not in the default steps): `bash bench/run_gpu.sh reproduce` runs
# `python reproduce.py budget=gpu` (RUN_GPU_REPRODUCE_ARGS replaces `budget=gpu`) and brings back one archive,
# $OUT/reproduction-gpu.tgz (the device tool returns at most 8 files): the report in report/, each stage's
# records (runs/STAGE/{summary,reproduce_stage,eval_by_step}.json, runs/STAGE/logs/metrics.csv) and the
# files of each evaluation the call finished or reused in eval/, and gpu_use_TIME.csv (nvidia-smi's
# utilization and memory every second, one per call), so a run cut short still returns what it finished. The
# checkpoints stay on the machine. At commit 9cd9a49 budget=gpu needed more than 11 minutes on an H200 (647 s
# for its stages and first evaluation alone), more than one call's 600 s. It now pretrains half as long, no
# stage uses activation checkpointing, and the four fine-tunes (401 s one after the other then) train side by
# side, one train.py process each (budget.parallel_stages; their output comes back as runs/STAGE/process.log),
# while reproduce.py evaluates the base and then each fine-tune as it ends. At commit a6a68fa it fit: on an H200
# (2026-11-28) `bash bench/run_gpu.sh ops reproduce` took 230 s in one call by the device tool's clock, about
# 3.5 min of it the reproduce step (results/gpu-h200-2026-11-28-reproduce). When a call is cut,
# make the same call again at once, while the machine is warm (it is released after 30 s idle): the second call reuses
# the finished stages and evaluations, continues a stage cut midway from its last checkpoint (every 100
# steps; an evaluation cut midway starts over) and uses the wheels the first call installed.
# The step `ops` (bench/ops_per_step.py, about 20 s) measures what turning checkpointing off saves:
# `bash bench/run_gpu.sh ops reproduce`. Then, here
# (a new folder for each run; README cites each committed report):
#   r=$(mktemp -d) && tar xzf FILES_AT/reproduction-gpu.tgz -C "$r" && cp -r "$r/report" results/gpu-CARD-DATE-reproduce
#
# The whole script keeps within RUN_GPU_BUDGET_S (default 575 s, under the device tool's 600 s limit):
# each step has a cap (tests 75 s, bench 250 s, fsdp 150 s, compile the rest) and never eats the time
# kept back for the steps after it (CAP and FLOOR below). The tables are rewritten under $OUT after every
# row, so a step cut short still leaves what it measured. Files back in $OUT: test_gpu.log,
# bench.{log,md,json}, fsdp.log, fsdp_gpu_mem.csv, compile.{log,md,json}, ops.{md,log}, reproduce.log,
# reproduction-gpu.{tgz,md}, and cut.log / STEP.skipped when a step was cut or not started.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-${TMPDIR:-/tmp}/bench-out}
mkdir -p "$OUT"
steps=${*:-tests bench fsdp compile}
budget=${RUN_GPU_BUDGET_S:-575}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# Long windows allocate blocks of many sizes; expandable segments keep fragmentation from causing OOMs.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

site=${TMPDIR:-/tmp}/site
if python3 -c "import hydra, omegaconf" 2>/dev/null; then
  export PYTHONPATH=$PWD
elif PYTHONPATH=$site python3 -c "import hydra, omegaconf" 2>/dev/null; then
  export PYTHONPATH="$site:$PWD"  # installed by an earlier call on this (still warm) machine
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || { echo "run_gpu.sh: could not install .whl/*.whl (copy ../shared/gpu-wheels there and carry .whl)"; exit 2; }
  export PYTHONPATH="$site:$PWD"
fi

# Each step's cap (0: whatever is left) and the time kept back for it while earlier steps run, so that a
# slow step cannot starve the ones after it. Defaults fit 575 s: tests 75, bench 250, fsdp 150, compile the rest.
declare -A CAP=([tests]=75 [bench]=250 [fsdp]=150 [compile]=0 [reproduce]=0 [ops]=60)
declare -A FLOOR=([tests]=30 [bench]=120 [fsdp]=90 [compile]=60 [reproduce]=300 [ops]=45)
# A session with less device time left can move the caps, e.g. RUN_GPU_CAPS="bench=320 fsdp=150".
for pair in ${RUN_GPU_CAPS:-}; do CAP[${pair%%=*}]=${pair#*=}; done
# Extra arguments for the main benchmark, e.g. RUN_GPU_BENCH_ARGS="--windows 131072".
read -r -a bench_args <<< "${RUN_GPU_BENCH_ARGS:-}"
read -r -a reproduce_args <<< "${RUN_GPU_REPRODUCE_ARGS:-budget=gpu}"

# Seconds step $1 may run when steps $2.. are still to come (0: not worth starting).
allowance() {
  local step=$1 later left cap
  shift
  left=$((budget - SECONDS))
  for later in "$@"; do left=$((left - ${FLOOR[$later]:-0})); done
  cap=${CAP[$step]}
  if ((cap == 0 || left < cap)); then cap=$left; fi
  if ((cap < 45)); then cap=0; fi
  echo "$cap"
}

# FSDP2 through Lightning on one GPU with the 1.1B shape: 4 steps at its 2048-token window and a sharded
# checkpoint (~13 GB with AdamW's state), then a resume from it to step 6 and a second checkpoint. Validation is
# off: at the last step it would add a "best" and a second "last" write (validation under FSDP runs in
# tests/test_distributed.py on CPU).
fsdp_smoke() {
  local run_dir=${TMPDIR:-/tmp}/fsdp-1.1b
  local common=(trainer=fsdp trainer.devices=1 model=tinyllama-1.1b stage=pretrain register_base=false
    optim.pretrain.batch_size=2 trainer.limit_val_batches=0 trainer.log_every_n_steps=1
    trainer.checkpoint_every_n_steps=0 trainer.enable_progress_bar=false "run_dir=$run_dir")
  # A dry run off the GPU (the script's logic, a shrunk model) can append overrides, e.g. trainer.accelerator=cpu.
  local extra=()
  read -r -a extra <<< "${FSDP_SMOKE_OVERRIDES:-}"
  common+=(${extra[@]+"${extra[@]}"})
  rm -rf "$run_dir"
  # A plain background job: it stays in this process group, so the step's timeout ends it too; its
  # output goes to a file and /dev/null, never to the pipe into tee.
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/fsdp_gpu_mem.csv" 2>/dev/null &
  local sampler=$! rc=0
  python3 train.py "${common[@]}" optim.pretrain.max_steps=4 || rc=$?
  if ((rc == 0)); then
    du -sh "$run_dir"/checkpoints/.last.ckpt.*/
    python3 train.py "${common[@]}" optim.pretrain.max_steps=6 "resume=$run_dir/checkpoints/last.ckpt" || rc=$?
  fi
  kill "$sampler" 2>/dev/null
  echo "fsdp: metrics.csv"; cat "$run_dir/logs/metrics.csv" 2>/dev/null
  echo "fsdp: most GPU memory in use (nvidia-smi, MiB): $(sort -n "$OUT/fsdp_gpu_mem.csv" | tail -n 1)"
  echo "fsdp: exit status $rc"
  return $rc
}

# A benchmark's own budget: it starts no new row after that, so leave it time to finish the last one.
row_budget() { if (($1 > 2 * $2)); then echo $(($1 - $2)); else echo $(($1 / 2)); fi; }

status=0
read -r -a planned <<< "$steps"
for i in "${!planned[@]}"; do
  step=${planned[$i]}
  if [[ -z ${CAP[$step]+set} ]]; then
    echo "run_gpu.sh: unknown step '$step' (tests, bench, fsdp, compile, reproduce, ops)"; status=2; continue
  fi
  cap=$(allowance "$step" "${planned[@]:i+1}")
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
      } 2>&1 | tee "$OUT/test_gpu.log"
      rc=${PIPESTATUS[0]} ;;
    bench)
      timeout -k 5 "$cap" python3 bench/gpu_train_throughput.py --budget-s "$(row_budget "$cap" 70)" --md bench.md \
        ${bench_args[@]+"${bench_args[@]}"} 2>&1 \
        | tee "$OUT/bench.log"
      rc=${PIPESTATUS[0]} ;;
    fsdp)
      export -f fsdp_smoke
      timeout -k 5 "$cap" bash -c fsdp_smoke 2>&1 | tee "$OUT/fsdp.log"
      rc=${PIPESTATUS[0]}
      rm -rf "${TMPDIR:-/tmp}/fsdp-1.1b" ;;  # ~26 GB of checkpoints, also when the step was cut short
    compile)
      timeout -k 5 "$cap" python3 bench/gpu_train_throughput.py --suite compile --budget-s "$(row_budget "$cap" 40)" \
        --md compile.md 2>&1 | tee "$OUT/compile.log"
      rc=${PIPESTATUS[0]} ;;
    ops)
      # The reproduction model's step by activation-checkpointing mode: operations dispatched and time.
      timeout -k 5 "$cap" python3 bench/ops_per_step.py --device cuda --steps 20 2> "$OUT/ops.log" | tee "$OUT/ops.md"
      rc=${PIPESTATUS[0]} ;;
    reproduce)
      # A work folder inside the checkout (git-ignored) and named relative to it, so that the report's
      # commands name no machine's folders; the checkpoints stay there, on the machine.
      work=${RUN_GPU_REPRODUCE_WORK:-outputs/reproduce/device}
      # Finished stages and evaluations are reused (reproduce.py checks their settings and code); the report
      # is written anew. What an earlier call left is packed only where this call used it: an evaluation
      # this call finished or reused has a record newer than the stamp (reproduce.py touches a reused one).
      rm -rf "$work/report"
      mkdir -p "$work" && touch "$work/call_started"
      # budget=gpu trains its fine-tunes side by side, one process each, while reproduce.py holds the card too
      # (it trained the base): a card that takes one process at a time (compute mode Exclusive_Process) would
      # refuse them all. There, one at a time, in reproduce.py's own process.
      mode=$(nvidia-smi --query-gpu=compute_mode --format=csv,noheader 2>/dev/null) || mode=""
      mode=${mode%%$'\n'*}
      if [[ -n $mode && $mode != Default ]]; then
        echo "run_gpu.sh: compute mode $mode: the fine-tunes run one at a time"; reproduce_args+=(budget.parallel_stages=1)
      fi
      # The card's use, every second, beside the report's stage and evaluation times: how idle the side-by-side
      # fine-tunes and the evaluations made meanwhile leave it (one file per call; packed below).
      sampled="gpu_use_$(date +%H%M%S).csv"
      nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,nounits -l 1 > "$work/$sampled" 2>/dev/null &
      sampler=$!
      timeout -k 5 "$cap" python3 reproduce.py "${reproduce_args[@]}" "work_dir=$work" \
        "report_dir=$work/report" > "$OUT/reproduce.log" 2>&1
      rc=$?
      kill "$sampler" 2>/dev/null
      [ -s "$work/$sampled" ] || rm -f "$work/$sampled"  # no nvidia-smi (a CPU run of this script)
      grep -E "\[reproduce\]|stage|report written|Error|error" "$OUT/reproduce.log" | tail -n 40
      # One archive, also of a run cut short: the report, the evaluations this call finished or reused, and
      # each stage's small records (the training curves behind the report); no checkpoints.
      if [ -d "$work" ]; then
        ( cd "$work" && { find report -type f 2>/dev/null
          find eval -name reproduce_eval.json -newer call_started 2>/dev/null | while read -r record; do
            find "$(dirname "$record")" -type f
          done
          for file in runs/*/summary.json runs/*/reproduce_stage.json runs/*/eval_by_step.json runs/*/logs/metrics.csv \
            runs/*/process.log gpu_use_*.csv; do
            [ -f "$file" ] && echo "$file"
          done; } ) | tar czf "$OUT/reproduction-gpu.tgz" -C "$work" -T -
      fi
      [ -f "$work/report/README.md" ] && cp "$work/report/README.md" "$OUT/reproduction-gpu.md" ;;
  esac
  if ((rc == 124 || rc == 137)); then
    echo "run_gpu.sh: step '$step' was cut at its ${cap}s limit" | tee -a "$OUT/cut.log"
  fi
  ((rc == 0)) || status=1
done

# The reply keeps the end of the output: finish with the test summary and the tables.
echo; echo "=================== summary"
grep -E "passed|failed|error|skipped|PASSED|FAILED|ERROR" "$OUT/test_gpu.log" 2>/dev/null | tail -n 12
grep -E "^fsdp:|done in|Error|error:" "$OUT/fsdp.log" 2>/dev/null | grep -v "metrics.csv" | tail -n 6
cat "$OUT/cut.log" "$OUT"/*.skipped 2>/dev/null
[ -f "$OUT/reproduction-gpu.md" ] && { echo; head -n 40 "$OUT/reproduction-gpu.md"; }
for table in bench.md compile.md ops.md; do
  [ -f "$OUT/$table" ] && { echo; cat "$OUT/$table"; }
done
exit $status
