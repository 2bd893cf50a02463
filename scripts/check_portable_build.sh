#!/usr/bin/env bash
# Build the CPU extension as a non-x86 machine (ARM, ...) gets it and run the kernel tests against that build.
# COMPTRUST_PORTABLE_ONLY=1 (setup.py, csrc/cpu/isa.h) leaves out every AVX2 / AVX-512 / AMX kernel, so only the
# portable scalar ones remain. Why here: every x86 build picks its SIMD paths, so without this nothing compiles the
# portable build, and it once stopped compiling (helpers defined only inside the x86 blocks) unnoticed.
#
#   bash scripts/check_portable_build.sh              # after `make install` (uses .venv's python)
#   PYTHON=/path/to/python bash scripts/check_portable_build.sh
#
# Builds into a temporary folder (nothing in the tree or the venv changes), then runs the C++ kernel tests with
# that folder's copy of the installed package, its _C replaced by the portable one. Exits 1 on a build error
# (printing the compiler's errors) or a failed test.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
python="${PYTHON:-$repo_root/.venv/bin/python}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

start=$SECONDS
if ! COMPTRUST_PORTABLE_ONLY=1 COMPTRUST_SKIP_CUDA=1 "$python" setup.py -q build_ext \
    --build-temp "$work/temp" --build-lib "$work/lib" >"$work/build.log" 2>&1; then
  grep -E "error|Error" "$work/build.log" | head -40 >&2 || tail -40 "$work/build.log" >&2
  echo "portable build failed (COMPTRUST_PORTABLE_ONLY=1)" >&2
  exit 1
fi
echo "OK portable build ($((SECONDS - start))s)"

installed="$(cd "$work" && "$python" -c 'import comptrust, os; print(os.path.dirname(comptrust.__file__))')"
mkdir -p "$work/pkg"
cp -r "$installed" "$work/pkg/comptrust"
rm -f "$work"/pkg/comptrust/_C*.so
cp "$work"/lib/comptrust/_C*.so "$work/pkg/comptrust/"

cd tests
PYTHONPATH="$work/pkg" "$python" - <<'EOF'
import comptrust, comptrust.ops as ops
detail = ops.backends()["cpu"]
assert comptrust.__file__.startswith(__import__("os").environ["PYTHONPATH"]), comptrust.__file__
assert detail["available"] and ops.cpu_isa() == "scalar", f"the portable build should run scalar kernels: {detail}"
print("portable build loaded:", detail["detail"])
EOF
PYTHONPATH="$work/pkg" "$python" -m pytest -q -p no:cacheprovider \
  test_cpu_gemm_tiled.py test_cpu_int4_gemm.py test_cpu_int4_gemm_a8.py test_cpu_sparse24.py test_int8.py \
  test_bitmap_sparse.py test_decode_step_ops.py test_screened_argmax.py test_hessian_update.py \
  test_quant_linear.py test_sparse24_linear.py test_lean_decode.py
