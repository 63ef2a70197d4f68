#!/usr/bin/env bash
# Issue 6 on a lent GPU in one call: the GPU tests, the benchmark table, then the torch.compile rows.
#
# The device machine has torch, lightning and transformers but not hydra-core, omegaconf or antlr4.
# Once, in the checkout root on the session's machine, before the call:
#   echo /.whl/ >> .git/info/exclude
#   mkdir -p .whl && cp ../shared/gpu-wheels/*.whl .whl/
# Then the device tool (an H200: the 7B rows need about 115 GiB):
#   run(command="bash bench/run_gpu.sh", carry=[".whl"], timeout_s=600, kind="nvidia-h200")
# A rerun can pick steps, e.g. `bash bench/run_gpu.sh bench` (any of: tests bench compile).
#
# Each step has its own timeout (90 + 270 + 170 s, under 9 minutes in all); the tables are rewritten
# under $OUT after every row, so a step cut short still leaves what it measured. Files back in $OUT:
# test_gpu.log, bench.log, bench.md, bench.json, compile.log, compile.md, compile.json.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-${TMPDIR:-/tmp}/bench-out}
mkdir -p "$OUT"
steps=${*:-tests bench compile}
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

status=0
for step in $steps; do
  case $step in
    tests)
      { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv
        python3 -c "import torch, transformers, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'lightning', lightning.__version__)"
        timeout -k 5 90 python3 -m pytest -m gpu -q -rA -p no:cacheprovider tests/test_gpu.py
      } 2>&1 | tee "$OUT/test_gpu.log" || status=1 ;;
    bench)
      timeout -k 5 270 python3 bench/gpu_train_throughput.py --budget-s 200 --md bench.md 2>&1 \
        | tee "$OUT/bench.log" || status=1 ;;
    compile)
      timeout -k 5 170 python3 bench/gpu_train_throughput.py --suite compile --budget-s 130 --md compile.md 2>&1 \
        | tee "$OUT/compile.log" || status=1 ;;
    *) echo "run_gpu.sh: unknown step '$step' (tests, bench, compile)"; status=2 ;;
  esac
done

# The reply keeps the end of the output: finish with the test summary and the tables.
echo; echo "=================== summary"
grep -E "passed|failed|error|skipped|PASSED|FAILED|ERROR" "$OUT/test_gpu.log" 2>/dev/null | tail -n 12
for table in bench.md compile.md; do
  [ -f "$OUT/$table" ] && { echo; cat "$OUT/$table"; }
done
exit $status
