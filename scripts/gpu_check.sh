#!/usr/bin/env bash
# The GPU checks in one run, for a session lent a device machine (../.library/device: one command, ~10 minutes):
# build comptrust with its CUDA ops for this machine's GPU, on the python3 that holds its CUDA torch; run the CUDA
# and Triton tests on the GPU; then `comptrust bench gpu` (bench/gpu_kernels.py). What it prints also lands in
# $OUT (default ./gpu-check): build.log, tests.log, bench.txt, bench.json.
# Usage there: bash scripts/gpu_check.sh [--quick]     (--quick: the benchmark's 4096x4096 at batch 1 and 64 only)
# Exit status: 2 without a CUDA device, 1 if the build, a test or the benchmark failed, else 0.
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${OUT:-gpu-check}")
mkdir -p "$out"
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)" 2>/dev/null || {
  echo "gpu_check: python3 has no torch that sees a CUDA device" >&2
  exit 2
}
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
# One architecture, this GPU's (the compile checks in `make test` cover sm_80 and sm_90 without a GPU).
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
export TORCH_CUDA_ARCH_LIST MAX_JOBS=${MAX_JOBS:-$(nproc)} PYTHONUNBUFFERED=1
site=$(mktemp -d)
start=$SECONDS
if ! python3 -m pip install -v --no-build-isolation --no-deps --no-index --target "$site" . >"$out/build.log" 2>&1; then
  tail -40 "$out/build.log"
  echo "gpu_check: build failed (whole log: $out/build.log)" >&2
  exit 1
fi
grep -m1 "comptrust: building" "$out/build.log"
echo "build: $((SECONDS - start)) s"
export PYTHONPATH=$site
(cd tests && python3 -m pytest -q -ra -p no:cacheprovider test_cuda_*.py test_triton_*.py) >"$out/tests.log" 2>&1
tests=$?
tail -25 "$out/tests.log"
# From tests/ as the tests: the repo root's comptrust/ (no compiled _C, no comptrust.bench) must not shadow $site's.
(cd tests && python3 -m comptrust.cli bench gpu --no-progress ${1:+"$1"} --json "$out/bench.json") 2>&1 | tee "$out/bench.txt"
bench=${PIPESTATUS[0]}
echo "gpu_check: tests exit $tests, bench exit $bench, $((SECONDS - start)) s in all"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
