"""comptrust: compress LLMs onto real packed kernels and measure trust and efficiency in one run.

    import comptrust
    loaded = comptrust.load_model("default")
    comptrust.compress_(loaded.model, comptrust.RTNConfig(bits=4, group_size=128))
    comptrust.run(comptrust.RunConfig())        # dense vs compressed, report.json + report.md
"""
from comptrust.compress import RTNConfig, compress_
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
