#!/usr/bin/env bash
# Compile-check every CUDA source (csrc/cuda/*.cu) with nvcc for sm_80 and sm_90, warnings as errors.
# Needs no GPU and no CUDA build of torch: the .cu files are plain CUDA launchers (no torch headers).
#
#   bash scripts/compile_check_cuda.sh            # from any directory
#   NVCC=/path/to/nvcc bash scripts/compile_check_cuda.sh
#   COMPTRUST_SKIP_NVCC=1 ...                      # succeed with a SKIPPED line when nvcc is missing
#   COMPTRUST_NVCC_FLAGS="-Xptxas -v" ...          # extra flags (e.g. to see register use)
#
# Prints one line per file ("OK <file> (<seconds>s)"); on a failure prints nvcc's output and exits 1.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

nvcc_bin="${NVCC:-}"
if [[ -z "$nvcc_bin" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    nvcc_bin="$(command -v nvcc)"
  elif [[ -n "${CUDA_HOME:-}" && -x "${CUDA_HOME}/bin/nvcc" ]]; then
    nvcc_bin="${CUDA_HOME}/bin/nvcc"
  fi
fi
if [[ -z "$nvcc_bin" ]] || ! command -v "$nvcc_bin" >/dev/null 2>&1; then
  if [[ "${COMPTRUST_SKIP_NVCC:-0}" == "1" ]]; then
    echo "SKIPPED: nvcc not found and COMPTRUST_SKIP_NVCC=1"
    exit 0
  fi
  echo "nvcc not found: install the CUDA toolkit or set COMPTRUST_SKIP_NVCC=1" >&2
  exit 1
fi

shopt -s nullglob
sources=(csrc/cuda/*.cu)
shopt -u nullglob
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "no CUDA sources under csrc/cuda/*.cu" >&2
  exit 1
fi

out_dir="$(mktemp -d "${TMPDIR:-/tmp}/comptrust-nvcc.XXXXXX")"
trap 'rm -rf "$out_dir"' EXIT

flags=(
  -std=c++17 -O3
  -gencode arch=compute_80,code=sm_80
  -gencode arch=compute_90,code=sm_90
  -I csrc/include -I csrc
  -Xcompiler -Wall,-Wextra
  --Werror all-warnings
  # What torch's CUDAExtension adds to every nvcc call of the real build (no implicit half/bf16 conversions or
  # operators), so code that compiles here compiles there too.
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr
)
# Word-split on purpose: extra flags come as one string.
# shellcheck disable=SC2206
extra=(${COMPTRUST_NVCC_FLAGS:-})

echo "nvcc: $("$nvcc_bin" --version | tail -n 1) ($nvcc_bin)"
failed=0
for src in "${sources[@]}"; do
  obj="$out_dir/$(basename "${src%.cu}").o"
  start=$SECONDS
  if log="$("$nvcc_bin" "${flags[@]}" "${extra[@]}" -c "$src" -o "$obj" 2>&1)"; then
    echo "OK $src ($((SECONDS - start))s)"
    if [[ ${#extra[@]} -gt 0 && -n "$log" ]]; then echo "$log"; fi
  else
    echo "FAILED $src" >&2
    echo "$log" >&2
    failed=1
  fi
done
exit "$failed"
