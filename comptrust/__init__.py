"""comptrust: compress LLMs onto real packed kernels and measure trust and efficiency in one run.

    import comptrust
    loaded = comptrust.load_model("default")
    comptrust.compress_(loaded.model, comptrust.RTNConfig(bits=4, group_size=128))
    comptrust.run(comptrust.RunConfig())        # dense vs compressed, report.json + report.md
"""
import os

# torch's CPU allocator puts allocations of 2 MB and more on transparent huge pages with this switch, read once, at
# its first such allocation (importing the modules below already makes one); an explicit setting is left
# alone. Why: where the OS gives huge pages only on request (THP "madvise", as on the machine this was measured on),
# a batch-1 product streams its weights through 4 KB pages, and the hardware prefetchers stop at each page's end.
# `comptrust bench int --quick`, 4096 x 4096 at batch 1, two runs each way: our int4 (fp32 x) 0.41-0.50 -> 0.37 ms,
# int3 (int8 x) 0.32 -> 0.26-0.29, torch's int4pack 0.55-0.87 -> 0.50, bf16 F.linear 2.9-3.3 -> 2.2-2.4 ms (the
# anchors gain too, so the bench's ratios stay fair). The embedded model's layers are under 2 MB: its decode is unmoved.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from comptrust.compress import RTNConfig, compress_  # noqa: E402  (after the switch)
from comptrust.ops import backends

__version__ = "0.1.0"
__all__ = ["RTNConfig", "RunConfig", "backends", "compress_", "load_model", "run", "__version__"]


def __getattr__(name):
    # Loading models and running evaluations pulls in transformers; keep `import comptrust` light.
    if name == "load_model":
        from comptrust.models import load_model
        return load_model
    if name in ("run", "RunConfig"):
        from comptrust import run as run_module
        return getattr(run_module, name)
    raise AttributeError(f"module 'comptrust' has no attribute {name!r}")
