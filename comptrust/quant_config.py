"""The "quantization_config" entry of a checkpoint's config.json: read (GPTQ v1, AWQ GEMM) and written (GPTQ v1).

Hugging Face checkpoints say how their linear layers are stored in config.json, e.g.
    {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": true, "sym": true, "format": "gptq"}
    {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": true, "version": "gemm"}
Only layouts our kernels run without a lossy conversion are accepted; everything else is refused here,
before any tensor is read, with the field that decided it. Kernel choices a config may carry
(GPTQ "backend", "use_exllama", "exllama_config") describe how another library would run the same
GPTQ v1 tensors, so they are ignored rather than refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from comptrust.models import ModelLoadError

OUR_KEY = "comptrust"      # our own entries live under quantization_config["comptrust"]
_GPTQ_BITS = (3, 4, 8)
_AWQ_BITS = (4,)


@dataclass(frozen=True)
class CheckpointQuantization:
    """What a checkpoint's quantization_config says, validated."""
    quant_method: str           # tensor layout: "gptq" (v1) or "awq" (GEMM)
    bits: int
    group_size: int             # -1: one group per output column over all inputs
    symmetric: bool
    desc_act: bool              # act-order; the g_idx tensors decide, this is informational
    act_bits: int | None        # ours: 8 runs the layers on int8 activations
    tag: str                    # short name for reports, e.g. "rtn-w4g128" or "gptq-w4g128-act-order"
    raw: dict = field(default_factory=dict, compare=False)

    @property
    def modules(self) -> list[str] | None:
        """The quantized layers a comptrust checkpoint lists (None for other tools' checkpoints)."""
        return (self.raw.get(OUR_KEY) or {}).get("quantized_modules")


def _int(raw: dict, key: str, where: str, default=None) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelLoadError(f"{where}: quantization_config.{key} must be an integer, got {value!r}")
    return value


def _bits(raw: dict, method: str, allowed: tuple[int, ...], where: str) -> int:
    bits = _int(raw, "bits", where)
    if bits not in allowed:
        raise ModelLoadError(f"{where}: {method} checkpoints with bits={bits} are not supported; comptrust's kernels "
                             f"run {method} bits {' and '.join(map(str, allowed))}")
    return bits


def _group_size(raw: dict, where: str) -> int:
    group_size = _int(raw, "group_size", where, default=-1)
    if group_size != -1 and group_size <= 0:
        raise ModelLoadError(f"{where}: quantization_config.group_size={group_size} must be -1 or positive")
    return group_size


def _our_act_bits(raw: dict, where: str) -> int | None:
    act_bits = (raw.get(OUR_KEY) or {}).get("act_bits")
    if act_bits not in (None, 8):
        raise ModelLoadError(f"{where}: quantization_config.{OUR_KEY}.act_bits={act_bits!r} must be null or 8")
    return act_bits


def _parse_gptq(raw: dict, where: str) -> CheckpointQuantization:
    # transformers >= 5 writes "format"; AutoGPTQ / optimum wrote "checkpoint_format"; absent means v1.
    fmt = str(raw.get("format") or raw.get("checkpoint_format") or "gptq").lower()
    if raw.get("is_marlin_format"):
        fmt = "marlin"
    if fmt != "gptq":
        why = {"gptq_v2": "GPTQ v2 stores zero points without v1's -1 offset",
               "marlin": "Marlin re-tiles the weights for its own kernel"}.get(fmt, "an unknown layout")
        raise ModelLoadError(f"{where}: GPTQ checkpoint format {fmt!r} is not supported ({why}); comptrust reads "
                             "GPTQ v1 ('gptq') checkpoints. Convert it to v1 with the tool that wrote it.")
    pack_dtype = str(raw.get("pack_dtype", "int32")).removeprefix("torch.")
    if pack_dtype != "int32":
        raise ModelLoadError(f"{where}: GPTQ pack_dtype {pack_dtype!r} is not supported (GPTQ v1 packs into int32)")
    bits = _bits(raw, "GPTQ", _GPTQ_BITS, where)
    group_size = _group_size(raw, where)
    symmetric, desc_act = bool(raw.get("sym", True)), bool(raw.get("desc_act", False))
    act_bits = _our_act_bits(raw, where)
    if bits == 8 and act_bits == 8:
        raise ModelLoadError(f"{where}: int8 weights run with float activations only; "
                             f"quantization_config.{OUR_KEY}.act_bits must be null")
    ours = raw.get(OUR_KEY) or {}
    tag = ours.get("tag") or (f"gptq-w{bits}g{group_size}" + ("-sym" if symmetric else "")
                              + ("-act-order" if desc_act else ""))
    return CheckpointQuantization("gptq", bits, group_size, symmetric, desc_act, act_bits, str(tag), raw)


def _parse_awq(raw: dict, where: str) -> CheckpointQuantization:
    # AutoAWQ wrote "version"; transformers >= 5 writes "format". GEMM is the layout formats/awq.py reads;
    # GEMV / GEMV-fast / llm-awq interleave the weights differently.
    fmt = str(raw.get("format") or raw.get("version") or "gemm").lower()
    if fmt != "gemm":
        raise ModelLoadError(f"{where}: AWQ format {fmt!r} is not supported; comptrust reads AWQ 'gemm' checkpoints")
    if raw.get("zero_point", True) is False:
        raise ModelLoadError(f"{where}: AWQ checkpoints without zero points (zero_point=false) are not supported")
    bits = _bits(raw, "AWQ", _AWQ_BITS, where)
    group_size = _group_size(raw, where)
    act_bits = _our_act_bits(raw, where)
    return CheckpointQuantization("awq", bits, group_size, False, False, act_bits, f"awq-w{bits}g{group_size}", raw)


_PARSERS = {"gptq": _parse_gptq, "awq": _parse_awq}


def parse_quantization_config(raw, where: str) -> CheckpointQuantization:
    """Validate a quantization_config dict; `where` (the checkpoint path) prefixes every error."""
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{where}: quantization_config must be a JSON object, got {type(raw).__name__}")
    method = str(raw.get("quant_method", "")).lower()
    if method not in _PARSERS:
        raise ModelLoadError(f"{where}: quant_method {raw.get('quant_method')!r} is not supported; comptrust loads "
                             f"{' and '.join(sorted(_PARSERS))} checkpoints (GPTQ v1, AWQ GEMM)")
    return _PARSERS[method](raw, where)


def gptq_quantization_config(bits: int, group_size: int, symmetric: bool, desc_act: bool, lm_head: bool,
                             ours: dict) -> dict:
    """The quantization_config we write: what AutoGPTQ / GPTQModel / transformers read for a GPTQ v1
    checkpoint, plus our own entries (method, tag, act_bits, which modules) under "comptrust"."""
    return {
        "quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": symmetric,
        "static_groups": False, "lm_head": lm_head,
        # Both spellings: transformers >= 5 reads "format", AutoGPTQ / optimum "checkpoint_format".
        "format": "gptq", "checkpoint_format": "gptq",
        OUR_KEY: ours,
    }
