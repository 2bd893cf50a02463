"""Llama-family checkpoints loaded without transformers, for a process that only decodes.

Why: `from transformers import LlamaForCausalLM` takes a process from ~220 MiB of RSS (torch) to ~440 MiB (it
imports torch._dynamo, torch.distributed.tensor and sympy): more than the whole int4 embedded model. A process that
serves greedy decoding needs none of it, since LeanDecoder runs the model's own modules (comptrust's kernels) and
takes from the model only its parameters, config and rotary angles. This module builds a module tree with
LlamaForCausalLM's names and parameters, so a checkpoint's tensors load into it by their keys, with the rotary
angles transformers computes for the rope types Llama checkpoints use (default, linear, llama3; tested against
transformers' own), and comptrust.checkpoint's loaders fill it as they fill transformers' skeleton: the same packed
layers (int4/int3, 2:4, pruned layers back on the bitmap kernel), the same checks.

It has no forward of its own: LeanDecoder (comptrust.lean_decode) is how it runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from comptrust.checkpoint import _read_config, load_dense_tensors, quantized_model, read_checkpoint_quantization
from comptrust.checkpoint_sparse24 import read_sparse24_entry, sparse24_model
from comptrust.lean_decode import unsupported_reason
from comptrust.models import ModelLoadError, ModelNotFoundError

ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class LeanLlamaConfig:
    """What LeanDecoder and the module tree read of a Llama config.json, under transformers' attribute names."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_parameters: dict = field(hash=False)  # rope_type, rope_theta and the type's own keys
    tie_word_embeddings: bool = False  # LlamaConfig's defaults where config.json omits a key
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    pretraining_tp: int = 1
    model_type: str = "llama"

    @classmethod
    def from_dict(cls, raw: dict, source: str) -> "LeanLlamaConfig":
        """From config.json's contents; a ModelLoadError naming `source` and the key for anything missing or
        unsupported."""
        if raw.get("model_type") != "llama":
            raise ModelLoadError(f"{source}: model_type {raw.get('model_type')!r}: the lean runtime runs Llama-"
                                 "architecture models only")

        def need(key: str, kind: type = int, default=None):
            value = raw.get(key, default)
            if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
                raise ModelLoadError(f"{source}: config.json needs a positive {kind.__name__} {key!r}, got {value!r}")
            return value

        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        head_dim = raw.get("head_dim") or hidden // heads
        kv_heads = raw.get("num_key_value_heads") or heads
        if not isinstance(kv_heads, int) or heads % kv_heads:
            raise ModelLoadError(f"{source}: num_key_value_heads {kv_heads!r} does not divide "
                                 f"num_attention_heads {heads}")
        return cls(vocab_size=need("vocab_size"), hidden_size=hidden, intermediate_size=need("intermediate_size"),
                   num_hidden_layers=need("num_hidden_layers"), num_attention_heads=heads, num_key_value_heads=kv_heads,
                   head_dim=head_dim, rms_norm_eps=need("rms_norm_eps", float, 1e-6),
                   rope_parameters=_rope_parameters(raw, source),
                   tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                   hidden_act=raw.get("hidden_act", "silu"), attention_bias=bool(raw.get("attention_bias", False)),
                   mlp_bias=bool(raw.get("mlp_bias", False)), pretraining_tp=raw.get("pretraining_tp", 1))


def _rope_parameters(raw: dict, source: str) -> dict:
    """rope_parameters as transformers 5 writes it, also from the older rope_theta + rope_scaling keys."""
    params = dict(raw.get("rope_parameters") or {})
    if not params:
        params = dict(raw.get("rope_scaling") or {})
        params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ModelLoadError(f"{source}: rope type {rope_type!r}: the lean runtime computes {', '.join(ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelLoadError(f"{source}: partial_rotary_factor {params['partial_rotary_factor']}: the lean runtime "
                             "rotates whole heads")
    needed = {"default": (), "linear": ("factor",), "llama3": _LLAMA3_KEYS}[rope_type]
    missing = [key for key in ("rope_theta",) + needed if not isinstance(params.get(key), (int, float))]
    if missing:
        raise ModelLoadError(f"{source}: {rope_type} rope needs numeric {missing} in rope_parameters")
    return {**params, "rope_type": rope_type}


def inverse_frequencies(config: LeanLlamaConfig) -> torch.Tensor:
    """The rotary inverse frequencies transformers computes for this rope type (modeling_rope_utils), op for op."""
    params, dim = config.rope_parameters, config.head_dim
    inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
    if params["rope_type"] == "linear":
        return inv_freq / params["factor"]
    if params["rope_type"] == "llama3":
        factor, low, high, old_context = (params[key] for key in _LLAMA3_KEYS)
        low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class LeanRotary(nn.Module):
    """(cos, sin) for positions, as LlamaRotaryEmbedding.forward returns them (these rope types scale by 1)."""

    def __init__(self, config: LeanLlamaConfig):
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(config), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


# The tree is built on the meta device (the loaders assign the checkpoint's tensors), each parameter made empty
# there directly: initialising one on meta (nn.Embedding's normal_) imports torch._dynamo and sympy, ~145 MiB.
_META = "meta"


class _Norm(nn.Module):
    """An RMSNorm's weight (LeanDecoder's fused ops apply it)."""

    def __init__(self, size: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype, device=_META))


class _Attention(nn.Module):
    def __init__(self, c: LeanLlamaConfig, dtype: torch.dtype):
        super().__init__()
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        linear = dict(bias=c.attention_bias, dtype=dtype, device=_META)
        self.q_proj = nn.Linear(c.hidden_size, q, **linear)
        self.k_proj = nn.Linear(c.hidden_size, kv, **linear)
        self.v_proj = nn.Linear(c.hidden_size, kv, **linear)
        self.o_proj = nn.Linear(q, c.hidden_size, **linear)


class _MLP(nn.Module):
    def __init__(self, c: LeanLlamaConfig, dtype: torch.dtype):
        super().__init__()
        linear = dict(bias=c.mlp_bias, dtype=dtype, device=_META)
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, **linear)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, **linear)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, **linear)


class _DecoderLayer(nn.Module):
    def __init__(self, c: LeanLlamaConfig, dtype: torch.dtype):
        super().__init__()
        self.self_attn = _Attention(c, dtype)
        self.mlp = _MLP(c, dtype)
        self.input_layernorm = _Norm(c.hidden_size, dtype)
        self.post_attention_layernorm = _Norm(c.hidden_size, dtype)


class _Backbone(nn.Module):
    def __init__(self, c: LeanLlamaConfig, dtype: torch.dtype):
        super().__init__()
        table = torch.empty(c.vocab_size, c.hidden_size, dtype=dtype, device=_META)
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, _weight=table)  # _weight: no initialisation
        self.layers = nn.ModuleList(_DecoderLayer(c, dtype) for _ in range(c.num_hidden_layers))
        self.norm = _Norm(c.hidden_size, dtype)
        self.rotary_emb = LeanRotary(c)


class LeanLlamaForCausalLM(nn.Module):
    """LlamaForCausalLM's parameters under its names, on the meta device until a loader assigns them, without its
    forward (decode it with LeanDecoder); the rotary frequencies computed for real, as transformers' skeleton in
    comptrust.checkpoint has them."""

    def __init__(self, config: LeanLlamaConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.model = _Backbone(config, dtype)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype, device=_META)

    def get_expanded_tied_weights_keys(self, all_submodels: bool = True) -> dict[str, str]:
        """{target: source} as transformers' method answers for Llama (comptrust.checkpoint ties by it)."""
        return {"lm_head.weight": "model.embed_tokens.weight"} if self.config.tie_word_embeddings else {}


def load_lean_model(path, dtype: torch.dtype = torch.float32) -> LeanLlamaForCausalLM:
    """A Llama checkpoint directory (dense, pruned, GPTQ/AWQ, comptrust 2:4) as a LeanLlamaForCausalLM on the same
    layers load_model would give it, in eval mode; ModelNotFoundError / ModelLoadError as load_model's."""
    path = Path(path)
    if not path.is_dir():
        raise ModelNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    config = LeanLlamaConfig.from_dict(_read_config(path), str(path / "config.json"))

    def skeleton() -> LeanLlamaForCausalLM:
        return LeanLlamaForCausalLM(config, dtype)

    reason = unsupported_reason(skeleton())  # before reading any tensor
    if reason is not None:
        raise ModelLoadError(f"{path}: the lean runtime cannot run this model: {reason}")
    if read_sparse24_entry(path) is not None:
        model = sparse24_model(path, skeleton)[0]
    elif read_checkpoint_quantization(path) is not None:
        model = quantized_model(path, skeleton)[0]
    else:
        model = load_dense_tensors(path, skeleton)
    return model.eval()
