#!/usr/bin/env python
"""Compile every Triton kernel in kernels/ ahead of time to PTX, with no GPU needed.

Under TRITON_INTERPRET=1 kernels only run through the Python interpreter, which accepts code the real
compiler rejects (layouts, dtype rules of tl.dot, constexpr misuse). Lowering to PTX for a real target is
the check that the kernels would compile on a GPU.

A kernel module takes part by defining `aot_compile_ptx(arch, **config) -> str` and optionally
`AOT_CONFIGS` (a sequence of keyword dicts, one per variant worth compiling). A module under kernels/
that defines Triton kernels but no `aot_compile_ptx` is reported as an error, so new kernels cannot
silently skip the check.

Usage: python scripts/compile_check_triton.py [--arch 80 [90 ...]]
Exit status: 0 when everything compiled, 1 on any compile error, 2 when Triton is missing.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import traceback
from pathlib import Path

# triton.jit decides between the compiler and the interpreter when the decorator runs (at import of a
# kernel module), so the variable must be gone before any kernel module is imported.
os.environ.pop("TRITON_INTERPRET", None)

KERNELS_DIR = Path(__file__).resolve().parent.parent / "kernels"


def _load_by_path(path: Path):
    # Loaded by file path rather than as comptrust.kernels.* so a bare source checkout works too.
    name = f"_compile_check_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _defines_triton_kernels(module) -> bool:
    from triton.runtime.jit import JITFunction

    return any(isinstance(v, JITFunction) for v in vars(module).values())


def _describe(config: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items()) or "default"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80], help="CUDA compute capabilities (default 80)")
    args = parser.parse_args(argv)

    try:
        import triton
    except ImportError as exc:
        print(f"compile_check_triton: triton is not installed ({exc})", file=sys.stderr)
        return 2
    from triton.compiler.errors import CompilationError

    print(f"triton {triton.__version__}; kernels from {KERNELS_DIR}")

    failures: list[str] = []
    compiled = 0
    for path in sorted(KERNELS_DIR.glob("*.py")):
        if path.name.startswith("_"):
            continue
        rel = f"kernels/{path.name}"
        try:
            module = _load_by_path(path)
        except Exception:
            failures.append(f"{rel}: import failed\n{traceback.format_exc()}")
            continue
        aot = getattr(module, "aot_compile_ptx", None)
        if aot is None:
            if _defines_triton_kernels(module):
                failures.append(f"{rel}: defines Triton kernels but no aot_compile_ptx(), so it cannot be checked")
            continue
        for arch in args.arch:
            for config in getattr(module, "AOT_CONFIGS", None) or ({},):
                label = f"{rel} sm_{arch} [{_describe(config)}]"
                start = time.perf_counter()
                try:
                    ptx = aot(arch, **config)
                except CompilationError as exc:
                    # Its message already points at the offending line of the kernel source.
                    failures.append(f"{label}: compile error: {exc}")
                    print(f"FAIL {label}", flush=True)
                    continue
                except Exception as exc:
                    failures.append(f"{label}: compile error: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
                    print(f"FAIL {label}", flush=True)
                    continue
                if ".entry" not in ptx:
                    failures.append(f"{label}: output has no .entry, not a PTX kernel")
                    print(f"FAIL {label}", flush=True)
                    continue
                compiled += 1
                print(f"ok   {label}: PTX {len(ptx)} bytes ({time.perf_counter() - start:.1f} s)", flush=True)

    if failures:
        print(f"\ncompile_check_triton: {len(failures)} failure(s):", file=sys.stderr)
        for failure in failures:
            print(f"- {failure}", file=sys.stderr)
        return 1
    if compiled == 0:
        print("compile_check_triton: no kernel in kernels/ provides aot_compile_ptx()", file=sys.stderr)
        return 1
    print(f"compile_check_triton: {compiled} kernel variant(s) compiled to PTX")
    return 0


if __name__ == "__main__":
    sys.exit(main())
