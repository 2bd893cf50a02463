"""Builds comptrust._C: the CPU ops always, the CUDA ops only when torch has CUDA and a toolkit exists.

Environment switches:
  COMPTRUST_SKIP_CUDA=1   never build the CUDA sources
  COMPTRUST_FORCE_CUDA=1  build them even if torch reports no CUDA device (needs a CUDA build of torch)
  COMPTRUST_PORTABLE_ONLY=1  leave out the x86 SIMD kernels: the build a non-x86 CPU gets (csrc/cpu/isa.h),
                          to check it on x86 (scripts/check_portable_build.sh)
"""
import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_build_decision():
    if os.environ.get("COMPTRUST_SKIP_CUDA") == "1":
        return False, "COMPTRUST_SKIP_CUDA=1"
    import torch

    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build (torch.version.cuda is None)"
    if cpp_extension.CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    if not torch.cuda.is_available() and os.environ.get("COMPTRUST_FORCE_CUDA") != "1":
        return False, "torch sees no GPU; set COMPTRUST_FORCE_CUDA=1 to build anyway"
    return True, f"CUDA {torch.version.cuda} at {cpp_extension.CUDA_HOME}"


def _extension():
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc/include")]
    # -fopenmp at compile time activates at::parallel_for's OpenMP region; we do not link a libgomp
    # of our own, so the symbols bind to the runtime torch already loaded (one pool, torch's thread count).
    cxx_flags = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    if os.environ.get("COMPTRUST_PORTABLE_ONLY") == "1":
        cxx_flags.append("-DCOMPTRUST_PORTABLE_ONLY")
    with_cuda, why = _cuda_build_decision()
    if not with_cuda:
        print(f"comptrust: building CPU ops only; CUDA skipped: {why}")
        return cpp_extension.CppExtension(
            "comptrust._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags}
        )
    print(f"comptrust: building CPU and CUDA ops ({why})")
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    return cpp_extension.CUDAExtension(
        "comptrust._C",
        sources,
        include_dirs=include_dirs,
        define_macros=[("COMPTRUST_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
    )


setup(
    # The data folders are listed as packages of their own, as setuptools wants for folders it could import.
    packages=["comptrust", "comptrust.nn", "comptrust.compress", "comptrust.compress.data", "comptrust.formats",
              "comptrust.kernels", "comptrust.evals", "comptrust.evals.data", "comptrust.bench"],
    package_dir={"comptrust.kernels": "kernels", "comptrust.evals": "evals", "comptrust.bench": "bench"},
    package_data={"comptrust.evals.data": ["*.jsonl", "*.json", "*.txt"], "comptrust.compress.data": ["*.txt"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
