"""Batch-1 greedy decoding of Llama-family models without transformers' per-layer machinery.

Why: at batch 1 a compressed layer costs microseconds, and transformers' eager forward (cache objects, mask
building, kwargs threading, ~60 tensor ops per layer) costs more than the layers themselves: on the embedded
model it took 13-18 ms of every token with all linears stubbed out, more than all 210 int4 layers together
(6-9 ms). A speed figure taken through it mostly measures that harness and hides what compression buys.

This decoder runs the model's own modules with transformers' Llama math and ~12 op calls per layer: a
preallocated KV cache, rotary angles from the model's own rotary module, fused residual+RMSNorm and
attention-step ops (comptrust.ops, C++ on CPU), and each linear's own forward (dense, int4/int3 tiled, 2:4...),
so every kernel is the one the model really runs. `unsupported_reason` says why a model is not one it computes
exactly (the caller then uses transformers); tests hold its logits to transformers' forward.

Decode steps (one token) go further where every linear is one C++ can call as its module would (a bias-free
nn.Linear, a bitmap sparse layer, or a tiled compressed layer's own op): the whole layer stack runs as one call of a
DecodeProgram (csrc/cpu/decode_program.cpp), the same ops in the same order, bit-identical to the Python loop, without
the ~9 Python-level op calls per layer that were a third of an int4 token's time; greedy steps (next_token,
steps) also take the embedding, final norm, output projection and argmax into that call.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from comptrust import ops, reference
from comptrust.memory import in_clean_file_mapping
from comptrust.nn.bitmap_sparse_linear import BitmapSparseLinear
from comptrust.nn.quant_linear import shared_input_call, shared_input_tiles
from comptrust.nn.tiled_linear import TiledLinear

_LAYER_PARTS = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """None when `model` is a Llama-architecture causal LM this decoder computes exactly as transformers does,
    otherwise what differs."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "llama":
        return f"model type {getattr(config, 'model_type', None)!r} is not llama"
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            return f"config.{flag} is set"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {getattr(config, 'hidden_act', None)!r} is not silu"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") in ("dynamic", "longrope"):  # their angles depend on the sequence length
        return f"rope type {rope['rope_type']!r} rescales with the sequence length"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "config.pretraining_tp is not 1"
    decoder = getattr(model, "model", None)
    if not all(hasattr(decoder, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")) \
            or not hasattr(model, "lm_head"):
        return "the module tree is not LlamaForCausalLM's"
    dtype = decoder.embed_tokens.weight.dtype
    for index, layer in enumerate(decoder.layers):
        missing = [part for part in _LAYER_PARTS if _submodule(layer, part) is None]
        if missing:
            return f"layer {index} has no {', '.join(missing)}"
        norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        if any(norm.dtype != dtype for norm in norms):
            return f"layer {index}'s norm weights are not {dtype} like the embeddings"
    return None


def _submodule(module: torch.nn.Module, dotted: str) -> torch.nn.Module | None:
    for name in dotted.split("."):
        module = getattr(module, name, None)
    return module


@dataclass(frozen=True)
class _Layer:
    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor
    # x -> outputs: several layers of one input go through one op where they can (shared_input_call).
    qkv: Callable[[torch.Tensor], list[torch.Tensor]]
    gate_up: Callable[[torch.Tensor], list[torch.Tensor]]
    # Bound forward methods, called directly: module __call__ adds hook bookkeeping on every call.
    o: Callable
    down: Callable


def _gemv_weight(module: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    """The weight of a plain bias-free nn.Linear of the model's dtype that ops.dense_gemv can take one row of x
    through (on the CPU, the C++ ops built), else None."""
    if type(module) is not torch.nn.Linear or module.bias is not None or not ops.cpu_kernels_available():
        return None
    weight = module.weight
    usable = weight.device.type == "cpu" and weight.dtype == dtype and weight.is_contiguous()
    return weight if usable else None


def _linear_call(module: torch.nn.Module, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> the layer's output. A plain fp32/bf16 nn.Linear runs one-row x (decode steps) on ops.dense_gemv:
    torch's MKL sgemv ran the embedded model's layers and its 49152 x 576 output projection on one thread here
    (11 GB/s; the projection alone was 9.7 ms of an int4 token's 15.4), and dense layers, the output projection
    and every compressed model's uncompressed layers all go the same way. Otherwise the module's own forward."""
    weight = _gemv_weight(module, dtype)
    if weight is None:
        return module.forward
    k = weight.shape[1]
    return lambda x: ops.dense_gemv(x, weight) if x.numel() == k else F.linear(x, weight)


def _shared_input(modules: list[torch.nn.Module], dtype: torch.dtype) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    fused = shared_input_call(modules)
    if fused is not None:
        return fused
    calls = [_linear_call(module, dtype) for module in modules]
    return lambda x: [call(x) for call in calls]


def _layer(layer: torch.nn.Module, dtype: torch.dtype) -> _Layer:
    attn, mlp = layer.self_attn, layer.mlp
    return _Layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                  _shared_input([attn.q_proj, attn.k_proj, attn.v_proj], dtype),
                  _shared_input([mlp.gate_proj, mlp.up_proj], dtype),
                  _linear_call(attn.o_proj, dtype), _linear_call(mlp.down_proj, dtype))


def _program_linear(program, part: str, module: torch.nn.Module, dtype: torch.dtype) -> bool:
    """Add `module` to the program's `part` as the call the Python loop makes for it at a decode step; False if it
    has no such call."""
    if type(module) is torch.nn.Linear:
        weight = _gemv_weight(module, dtype)
        if weight is None:
            return False
        program.add_dense(part, weight)
        return True
    if isinstance(module, BitmapSparseLinear):
        if module.bias is not None or module.values.device.type != "cpu" or dtype != torch.float32:
            return False
        program.add_op(part, "comptrust::bitmap_sparse_gemm", [module.values, module.mask, module.row_start],
                       [module.in_features])
        return True
    # A tiled layer whose forward is TiledLinear's (not act-order's, which permutes x first), tiled on CPU.
    if not isinstance(module, TiledLinear) or type(module).forward is not TiledLinear.forward:
        return False
    kernel = module._kernel
    if kernel is None or module.bias is not None:
        return False
    op, args = kernel
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    ints = [a for a in args if not isinstance(a, torch.Tensor)]
    if args != (*tensors, *ints) or not all(type(a) is int for a in ints) or op._overloadname != "default":
        return False  # the program passes (x, tensors..., ints...) to the op's schema in that order
    program.add_op(part, op._schema.name, tensors, ints)
    return True


def decode_program(layers: list[torch.nn.Module], eps: float, scale: float, dtype: torch.dtype):
    """A DecodeProgram (csrc/cpu/decode_program.cpp) for these decoder layers of a model of `dtype`, or None when
    a linear is not one it can call exactly as the Python loop does, or the C++ ops are not built."""
    if not ops.cpu_kernels_available():
        return None
    program = torch.classes.comptrust.DecodeProgram(eps, scale)
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        program.add_layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        for part, modules in (("qkv", [attn.q_proj, attn.k_proj, attn.v_proj]), ("o", [attn.o_proj]),
                              ("gate_up", [mlp.gate_proj, mlp.up_proj]), ("down", [mlp.down_proj])):
            shared = shared_input_tiles(modules) if len(modules) > 1 else None
            if shared is not None:
                tiles, act_bits = shared
                program.add_many(part, [t.weight for t in tiles], [t.zeros for t in tiles],
                                 [t.scales for t in tiles], tiles[0].bits, tiles[0].group_size, act_bits)
            elif not all(_program_linear(program, part, module, dtype) for module in modules):
                return None
    return program


def _program_head(program, model: torch.nn.Module, dtype: torch.dtype) -> bool:
    """Give the program the rest of a greedy step (DecodeProgram.greedy): the embedding table, the final norm
    and the output projection as the call LeanDecoder.forward makes for it; False where it has no such call."""
    decoder = model.model
    if type(decoder.embed_tokens) is not torch.nn.Embedding or not decoder.embed_tokens.weight.is_contiguous():
        return False
    head_weight = getattr(model.lm_head, "weight", None)  # a quantized head has none (and no screen)
    if isinstance(head_weight, torch.Tensor) and in_clean_file_mapping(head_weight):
        program.release_head_pages_when_screening()  # a checkpoint's view (the serving process): never all resident
    if not _program_linear(program, "head", model.lm_head, dtype):
        return False
    program.set_embedding(decoder.embed_tokens.weight, decoder.norm.weight)
    return True


class LeanDecoder:
    """Greedy decoding state for one sequence (batch 1) of at most `max_positions` tokens.

    `forward(ids)` appends ids [1, T] to the sequence and returns the logits [1, vocab] after its last token,
    `greedy_after(ids)` their argmax (through the head's screen where the program has one); `next_token(id)`
    appends one token and returns the greedy choice after it (one C++ call where the program has the whole step).
    `reset()` starts a new sequence, keeping the cache's memory. `use_program=False` keeps decode steps in the
    Python loop (the tests compare the two).
    """

    def __init__(self, model: torch.nn.Module, max_positions: int, use_program: bool = True):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"LeanDecoder cannot run this model: {reason}")
        if max_positions < 1:
            raise ValueError(f"max_positions must be at least 1, got {max_positions}")
        config, decoder = model.config, model.model
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.max_positions = max_positions
        self.position = 0
        self._embed = decoder.embed_tokens.forward
        self._final_norm = decoder.norm.weight
        weight = decoder.embed_tokens.weight
        # Rotary angles for every position, computed once: the rotary module's forward is elementwise in the
        # position, so a row of the table is what a step's own call returns (unsupported_reason refuses the rope
        # types whose frequencies change with the length reached), and that call, ~10 tensor ops, took 140-160 us
        # of every decode step here.
        probe = torch.empty(1, 1, 1, dtype=weight.dtype, device=weight.device)
        self._cos_sin = decoder.rotary_emb(probe, torch.arange(max_positions, device=weight.device).unsqueeze(0))
        self._lm_head = _linear_call(model.lm_head, weight.dtype)
        self.layers = [_layer(layer, weight.dtype) for layer in decoder.layers]
        self.program = None  # decode steps' C++ program, where every linear fits (decode_program)
        self._greedy_in_program = False  # whole greedy steps in one call (DecodeProgram.greedy)
        if use_program and weight.device.type == "cpu":
            self.program = decode_program(list(decoder.layers), self.eps, self.head_dim ** -0.5, weight.dtype)
            self._greedy_in_program = self.program is not None and _program_head(self.program, model, weight.dtype)
        # "screened": greedy tokens come from the program's int8 screen of the fp32 output projection and the fp32
        # rows it leaves (csrc/cpu/screened_argmax.h; the full projection's argmax exactly); "full": every logit.
        self.greedy_head = "screened" if self._greedy_in_program and self.program.screens_greedy() else "full"
        shape = (len(self.layers), self.kv_heads, max_positions, self.head_dim)
        self.keys = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.values = torch.zeros(shape, dtype=weight.dtype, device=weight.device)

    def reset(self) -> None:
        self.position = 0

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._lm_head(self._final_hidden(input_ids))

    @torch.inference_mode()
    def greedy_after(self, input_ids: torch.Tensor) -> int:
        """Append ids [1, T] and return the greedy choice after the last: forward's argmax, picked by the program's
        screen of the head where greedy steps use it (the same token; the whole fp32 head is not read)."""
        last = self._final_hidden(input_ids)
        if self.greedy_head == "screened":
            return int(self.program.head_argmax(last[0]))
        return int(self._lm_head(last).argmax(-1))

    def _final_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Append ids [1, T]; the final-normed hidden state [1, d] after the last of them."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [1, T] with T >= 1, got {list(input_ids.shape)}")
        start, length = self.position, input_ids.shape[1]
        end = start + length
        if end > self.max_positions:
            raise ValueError(f"the sequence would reach {end} tokens; this decoder holds {self.max_positions}")
        hidden = self._embed(input_ids)  # a fresh tensor: the residual adds below go into it in place
        cos, sin = (table[:, start:end] for table in self._cos_sin)  # [1, T, head_dim], as transformers
        if length == 1 and self.program is not None:
            pending = self.program.step(hidden, self.keys, self.values, cos, sin, start)
        else:
            pending = self._layers(hidden, start, cos, sin)
        self.position = end
        return ops.residual_rms_norm(hidden[:, -1], pending[:, -1], self._final_norm, self.eps)

    def _layers(self, hidden: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Every layer on hidden [1, T, d] (updated in place); returns the last one's MLP output, not yet added."""
        attend = self._attend_one if hidden.shape[1] == 1 else self._attend_chunk
        pending = None  # the last sublayer's output, added to `hidden` by the next norm
        for index, layer in enumerate(self.layers):
            normed = ops.residual_rms_norm(hidden, pending, layer.attn_norm, self.eps)
            attended = attend(layer, normed, index, start, cos, sin)
            normed = ops.residual_rms_norm(hidden, layer.o(attended), layer.mlp_norm, self.eps)
            gate, up = layer.gate_up(normed)
            pending = layer.down(ops.silu_mul(gate, up))
        return pending

    def _attend_one(self, layer: _Layer, normed, index: int, start: int, cos, sin) -> torch.Tensor:
        """A decode step: rotary, cache append and attention in one fused op."""
        query, key, value = layer.qkv(normed)
        return ops.decode_attention(query, key, value, self.keys[index], self.values[index], cos, sin, start,
                                    self.head_dim ** -0.5)

    def _attend_chunk(self, layer: _Layer, normed, index: int, start: int, cos, sin) -> torch.Tensor:
        """Several tokens (the prompt): causal attention over the cache through torch's SDPA."""
        length, end = normed.shape[1], start + normed.shape[1]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        query, key, value = layer.qkv(normed)
        query = reference.rotary(self._heads(query, self.heads), cos, sin)
        self.keys[index, :, start:end] = reference.rotary(self._heads(key, self.kv_heads), cos, sin)[0]
        self.values[index, :, start:end] = self._heads(value, self.kv_heads)[0]
        # causal, offset by the `start` tokens already in the cache
        mask = None
        if start:
            mask = torch.arange(end, device=normed.device) <= torch.arange(start, end, device=normed.device)[:, None]
        attended = F.scaled_dot_product_attention(
            query, self.keys[None, index, :, :end], self.values[None, index, :, :end], attn_mask=mask,
            is_causal=mask is None, scale=self.head_dim ** -0.5, enable_gqa=self.kv_heads != self.heads)
        return attended.transpose(1, 2).reshape(1, length, self.heads * self.head_dim)

    def _heads(self, states: torch.Tensor, heads: int) -> torch.Tensor:
        """[1, T, heads * head_dim] -> [1, heads, T, head_dim]"""
        return states.view(1, states.shape[1], heads, self.head_dim).transpose(1, 2)

    def next_token(self, token: int) -> int:
        """Append `token` and return the greedy choice after it: one DecodeProgram.greedy call where the program
        has the whole step, else forward and argmax (the same ops either way, so the same token)."""
        if not self._greedy_in_program:
            return int(self.forward(torch.tensor([[token]], device=self.keys.device)).argmax(-1))
        if self.position >= self.max_positions:
            raise ValueError(f"the sequence would reach {self.position + 1} tokens; this decoder holds "
                             f"{self.max_positions}")
        token = self.program.greedy(token, self.keys, self.values, *self._cos_sin, self.position)
        self.position += 1
        return token

    def greedy_tokens(self, prompt_ids: torch.Tensor, count: int) -> list[int]:
        """A new sequence: the prompt, then greedy steps until `count` tokens are chosen; those tokens."""
        self.reset()
        tokens = [self.greedy_after(prompt_ids)]
        while len(tokens) < count:
            tokens.append(self.next_token(tokens[-1]))
        return tokens

    def steps(self, prompt_ids: torch.Tensor, decode_tokens: int) -> tuple[float, float]:
        """A new sequence: the prompt's forward, then `decode_tokens` greedy steps; (prefill s, decode s)."""
        self.reset()
        start = time.perf_counter()
        token = self.greedy_after(prompt_ids)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(decode_tokens):
            token = self.next_token(token)
        return prefill, time.perf_counter() - start
