#!/usr/bin/env bash
# Compile-check every CUDA source (csrc/cuda/*.cu) with nvcc for sm_80 and sm_90, warnings as errors, and the
# torch bindings of their launchers (csrc/cuda/*_binding.cpp: host C++) with the host compiler, syntax only.
# Needs no GPU and no CUDA build of torch: the .cu files are plain CUDA launchers (no torch headers), and the
# bindings only need headers: torch's (the CPU wheel ships c10/cuda's) and the toolkit's CUDA runtime.
#
#   bash scripts/compile_check_cuda.sh            # from any directory
#   NVCC=/path/to/nvcc bash scripts/compile_check_cuda.sh
#   COMPTRUST_SKIP_NVCC=1 ...                      # succeed with a SKIPPED line when nvcc is missing
#   COMPTRUST_NVCC_FLAGS="-Xptxas -v" ...          # extra flags (e.g. to see register use)
#   PYTHON=/path/to/python ...                     # the Python whose torch the bindings see (default .venv's)
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

# The bindings compile in the real build only where torch has CUDA, which no CI machine has; without this they
# would meet a compiler first on a GPU machine. The CPU wheel lacks one generated header that c10/cuda's
# headers include (cuda_cmake_macros.h, which only says whether c10_cuda is a shared library); a stand-in
# saying it is, as in torch's own CUDA wheels, lets them parse.
python_bin="${PYTHON:-.venv/bin/python}"
if ! torch_includes="$("$python_bin" -c 'from torch.utils.cpp_extension import include_paths; import sysconfig
print(" ".join(include_paths() + [sysconfig.get_paths()["include"]]))' 2>&1)"; then
  echo "FAILED: no torch at $python_bin for the binding check (set PYTHON): $torch_includes" >&2
  exit 1
fi
cuda_includes="$("$nvcc_bin" --dryrun -c "${sources[0]}" -o "$out_dir/dryrun.o" 2>&1 |
  sed -n 's/^#\$ INCLUDES="\(.*\)".*/\1/p' | head -n 1)"
if [[ -z "$cuda_includes" ]]; then
  echo "FAILED: nvcc --dryrun named no CUDA include directory" >&2
  exit 1
fi
mkdir -p "$out_dir/stub/c10/cuda/impl"
echo '#define C10_CUDA_BUILD_SHARED_LIBS' > "$out_dir/stub/c10/cuda/impl/cuda_cmake_macros.h"
host_flags=(-std=c++17 -fsyntax-only -Wall -Wextra -Werror -isystem "$out_dir/stub" -I csrc/include -I csrc)
# Word-split on purpose: torch's include directories and nvcc's -I flags, all as system headers (their warnings
# are not ours).
# shellcheck disable=SC2086
for dir in $torch_includes; do host_flags+=(-isystem "$dir"); done
# shellcheck disable=SC2086
for flag in $cuda_includes; do host_flags+=(-isystem "${flag#-I}"); done
for src in csrc/cuda/*_binding.cpp; do
  start=$SECONDS
  if log="$("${CXX:-g++}" "${host_flags[@]}" "$src" 2>&1)"; then
    echo "OK $src ($((SECONDS - start))s)"
  else
    echo "FAILED $src" >&2
    echo "$log" >&2
    failed=1
  fi
done
exit "$failed"
