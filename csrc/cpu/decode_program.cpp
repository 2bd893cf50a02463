// A whole decode step of a Llama-family decoder stack in one call from Python (comptrust.lean_decode).
//
// Why: with the layers' kernels and the fused norm/attention ops in C++, what was left of an int4 token's
// time was Python: ~270 op calls per token (9 per layer), each a few microseconds of interpreter and
// dispatcher work, about a third of the token (perf, embedded model). This class holds the stack's program
// (norm weights and, per linear, the op and arguments its module would call) and runs the same ops in the
// same order, so its results are bit-identical to the Python loop's. Dense layers run comptrust::dense_gemv (as
// the loop's decode steps do), compressed ones their own tiled op, each named by schema and called boxed, except
// where an fp32 row can take the same product bound once to its weights (bound_gemv.h: dense rows, tiled and 2:4
// layers on the AVX-512 kernels), which skips the dispatcher's per-call work; a layer's q/k/v (gate/up) are bound
// together, one parallel region, as the tiled ones already run through gemm_tiled_many. Where every linear of an
// fp32 program is bound, a step makes no op calls at all: the norms, attention and silu(gate) * up run as raw kernel
// calls (decode_step.h) on preallocated buffers (float_layers; embedded int4 model 2.39 -> 2.52x the dense model's
// tokens/s, interleaved). Given the embedding
// table and the output projection too, `greedy` runs a whole greedy step, token id in, next token id out; over an
// fp32 head its argmax reads an int8 copy first (screened_argmax.h: the same token, int4 model 2.68 -> 3.56x the
// dense model's tokens/s, interleaved).
#include "cpu/torch_and_intrinsics.h"  // first: before anything reads torch

#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cpu/bound_gemv.h"
#include "cpu/decode_step.h"
#include "cpu/isa.h"
#include "cpu/screened_argmax.h"
#include "cpu/simd_common.h"

namespace comptrust::cpu {
namespace {

#ifdef COMPTRUST_X86
// first_argmax's rule in two vector passes over n > 0 floats (49152 logits, hot: 3.4 us with the call, against
// 43 us for torch.argmax and 169 us for a scalar loop): the largest value and whether there is a NaN, then the
// first index holding it (-0 == +0, as torch's comparisons have it too).
COMPTRUST_AVX512 int64_t first_argmax_avx512(const float* x, int64_t n) {
  __m512 top = _mm512_set1_ps(-INFINITY);
  __mmask16 nan = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    top = _mm512_max_ps(top, v);
  }
  float best = _mm512_reduce_max_ps(top);
  for (int64_t j = i; j < n; ++j) {
    nan |= std::isnan(x[j]) ? 1 : 0;
    best = x[j] > best ? x[j] : best;
  }
  int64_t j = 0;
  if (!nan) {
    const __m512 target = _mm512_set1_ps(best);
    for (; j + 16 <= n; j += 16) {
      const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + j), target, _CMP_EQ_OQ);
      if (hit) return j + __builtin_ctz(hit);
    }
  }
  for (; j < n; ++j)
    if (nan ? std::isnan(x[j]) : x[j] == best) return j;
  return 0;
}
#endif

// torch.argmax's answer for n > 0 floats: the first largest value, or the first NaN (torch's own argmax where the
// CPU has no AVX-512).
int64_t first_argmax_of(const float* x, int64_t n) {
#ifdef COMPTRUST_X86
  if (select_isa() == Isa::kAvx512) return first_argmax_avx512(x, n);
#endif
  return at::argmax(at::from_blob(const_cast<float*>(x), {n})).item<int64_t>();
}

// One linear layer, or several of one input: x -> outputs. Each keeps the boxed op calls the Python loop makes
// (one per layer, or one gemm_tiled_many) and, where the product can be bound (bound_gemv.h), runs an fp32 row
// through that instead: the same kernel over the same tiles, without the dispatcher's per-call work.
class LinearCall {
 public:
  // op_name's schema must read (Tensor x, <the tensors>, <the ints>): the tiled ops' do.
  static LinearCall boxed(const std::string& op_name, std::vector<at::Tensor> tensors, std::vector<int64_t> ints) {
    LinearCall call;
    call.op_ = c10::Dispatcher::singleton().findSchemaOrThrow(op_name.c_str(), "");
    const auto& arguments = call.op_->schema().arguments();
    TORCH_CHECK(arguments.size() == 1 + tensors.size() + ints.size(), "DecodeProgram: ", op_name, " takes ",
                arguments.size(), " arguments, got x, ", tensors.size(), " tensors and ", ints.size(), " ints");
    for (size_t i = 1; i < arguments.size(); ++i) {
      const bool tensor = i <= tensors.size();
      const c10::TypePtr expected = tensor ? c10::TypePtr(c10::TensorType::get()) : c10::TypePtr(c10::IntType::get());
      TORCH_CHECK(*arguments[i].type() == *expected, "DecodeProgram: ", op_name, "'s argument ", arguments[i].name(),
                  " is ", arguments[i].type()->str(), ", not the ", tensor ? "Tensor" : "int", " given there");
    }
    std::vector<c10::IValue> arguments_of_call(tensors.begin(), tensors.end());
    for (int64_t i : ints) arguments_of_call.emplace_back(i);
    call.calls_.push_back(std::move(arguments_of_call));
    call.op_name_ = op_name;
    call.layer_tensors_.push_back(std::move(tensors));
    call.ints_ = std::move(ints);
    call.bound_ = bind(call.op_name_, call.layer_tensors_, call.ints_);
    return call;
  }
  // Takes `next` (the next layer of the same input) into this call where both are boxed calls of one op and ints
  // that bind together: one parallel region for both. False, changing nothing, otherwise.
  bool absorb(const LinearCall& next) {
    if (op_name_.empty() || next.op_name_ != op_name_ || next.ints_ != ints_ || !bound_ || !next.bound_) return false;
    std::vector<std::vector<at::Tensor>> layers = layer_tensors_;
    layers.insert(layers.end(), next.layer_tensors_.begin(), next.layer_tensors_.end());
    std::shared_ptr<const BoundGemv> bound = bind(op_name_, layers, ints_);
    if (!bound) return false;
    layer_tensors_ = std::move(layers);
    calls_.insert(calls_.end(), next.calls_.begin(), next.calls_.end());
    bound_ = std::move(bound);
    return true;
  }
  // dense_gemv for each weight; bound together (one parallel region) where they are fp32.
  static LinearCall dense(std::vector<at::Tensor> weights) {
    LinearCall call;
    call.op_ = c10::Dispatcher::singleton().findSchemaOrThrow("comptrust::dense_gemv", "");
    for (const at::Tensor& w : weights) call.calls_.push_back({c10::IValue(w)});
    call.dense_weights_ = std::move(weights);
    call.bound_ = bind_dense_gemv(call.dense_weights_);
    return call;
  }
  // gemm_tiled_many: one x, several tiled weights of one format.
  static LinearCall many(std::vector<at::Tensor> weights, std::vector<at::Tensor> zeros,
                         std::vector<at::Tensor> scales, int64_t bits, int64_t group_size, int64_t act_bits) {
    LinearCall call;
    call.op_ = c10::Dispatcher::singleton().findSchemaOrThrow("comptrust::gemm_tiled_many", "");
    call.list_outputs_ = static_cast<int64_t>(weights.size());
    call.bound_ = bind_tiled_gemv(weights, zeros, scales, bits, group_size, act_bits);
    call.calls_.push_back({c10::IValue(std::move(weights)), c10::IValue(std::move(zeros)),
                           c10::IValue(std::move(scales)), c10::IValue(bits), c10::IValue(group_size),
                           c10::IValue(act_bits)});
    return call;
  }

  // The output widths of a call whose fp32 rows of k inputs take the bound product, else empty.
  std::vector<int64_t> bound_widths(int64_t k) const {
    return bound_ && bound_->k() == k ? bound_->widths() : std::vector<int64_t>{};
  }
  // The bound product (bound_widths(k) non-empty): x k floats, y[i] the i-th of bound_outputs() outputs.
  void run_bound(const float* x, float* const* y) const { bound_->run(x, y); }
  size_t bound_outputs() const { return bound_ ? bound_->widths().size() : 0; }

  // The dense weights of a dense call (extended by DecodeProgram::add_dense), else empty.
  const std::vector<at::Tensor>& dense_weights() const { return dense_weights_; }
  // "<layers> bound" or "<layers> op": how many layers this call computes, and whether an fp32 row takes the
  // bound product (DecodeProgram.describe).
  std::string describe() const {
    const size_t layers = list_outputs_ ? static_cast<size_t>(list_outputs_) : calls_.size();
    return std::to_string(layers) + (bound_ ? " bound" : " op");
  }

  // The bound product of these layers' boxed calls (each (x, layer_tensors[i]..., ints...)), where there is one:
  // gemm_tiled (bits, group_size, act_bits), sparse24_gemm_tiled, sparse24_int4_gemm_tiled (group_size,
  // act_bits) and bitmap_sparse_gemm (k).
  static std::shared_ptr<const BoundGemv> bind(const std::string& op_name,
                                               const std::vector<std::vector<at::Tensor>>& layer_tensors,
                                               const std::vector<int64_t>& ints) {
    const size_t count = layer_tensors[0].size();
    std::vector<std::vector<at::Tensor>> by_argument(count);
    for (const std::vector<at::Tensor>& tensors : layer_tensors)
      for (size_t a = 0; a < count; ++a) by_argument[a].push_back(tensors[a]);
    if (op_name == "comptrust::gemm_tiled" && count == 3 && ints.size() == 3)
      return bind_tiled_gemv(by_argument[0], by_argument[1], by_argument[2], ints[0], ints[1], ints[2]);
    if (op_name == "comptrust::sparse24_gemm_tiled" && count == 2 && ints.empty())
      return bind_sparse24_gemv(by_argument[0], by_argument[1]);
    if (op_name == "comptrust::bitmap_sparse_gemm" && count == 3 && ints.size() == 1)
      return bind_bitmap_sparse_gemv(by_argument[0], by_argument[1], by_argument[2], ints[0]);
    if (op_name == "comptrust::sparse24_int4_gemm_tiled" && count == 4 && ints.size() == 2)
      return bind_sparse24_int4_gemv(by_argument[0], by_argument[1], by_argument[2], by_argument[3], ints[0], ints[1]);
    return nullptr;
  }

  void run(const at::Tensor& x, std::vector<at::Tensor>& out) const {
    if (bound_ && x.scalar_type() == at::kFloat && x.is_contiguous() && x.numel() == bound_->k()) {
      std::vector<float*> y;
      for (int64_t n : bound_->widths()) {
        std::vector<int64_t> sizes = x.sizes().vec();
        sizes.back() = n;
        out.push_back(at::empty(sizes, x.options()));
        y.push_back(out.back().data_ptr<float>());
      }
      bound_->run(x.data_ptr<float>(), y.data());
      return;
    }
    for (const std::vector<c10::IValue>& arguments : calls_) {
      torch::jit::Stack stack;
      stack.reserve(1 + arguments.size());
      stack.emplace_back(x);
      stack.insert(stack.end(), arguments.begin(), arguments.end());
      op_->callBoxed(stack);
      if (list_outputs_ == 0) {
        out.push_back(std::move(stack[0]).toTensor());
      } else {
        for (auto& y : std::move(stack[0]).toTensorVector()) out.push_back(std::move(y));
      }
    }
  }

 private:
  std::optional<c10::OperatorHandle> op_;
  std::vector<std::vector<c10::IValue>> calls_;  // each boxed call's arguments after x
  std::string op_name_;                                 // boxed: the op, each layer's tensors, the ints
  std::vector<std::vector<at::Tensor>> layer_tensors_;
  std::vector<int64_t> ints_;
  int64_t list_outputs_ = 0;  // gemm_tiled_many: how many tensors its one call returns
  std::vector<at::Tensor> dense_weights_;
  std::shared_ptr<const BoundGemv> bound_;
};

struct LayerProgram {
  at::Tensor attn_norm, mlp_norm;
  std::vector<LinearCall> qkv, o, gate_up, down;  // qkv: one call of 3 outputs or 3 of one; likewise gate_up
};

class DecodeProgram : public torch::CustomClassHolder {
 public:
  // The signatures the CPU kernels register with (decode_step_cpu.cpp): the typed handles check them.
  using NormOp = at::Tensor(at::Tensor, const std::optional<at::Tensor>&, const at::Tensor&, double);
  using AttentionOp = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor, at::Tensor,
                                 const at::Tensor&, const at::Tensor&, int64_t, double);
  using SiluMulOp = at::Tensor(const at::Tensor&, const at::Tensor&);

  DecodeProgram(double eps, double scale)
      : eps_(eps),
        scale_(scale),
        norm_(c10::Dispatcher::singleton().findSchemaOrThrow("comptrust::residual_rms_norm", "").typed<NormOp>()),
        attention_(
            c10::Dispatcher::singleton().findSchemaOrThrow("comptrust::decode_attention", "").typed<AttentionOp>()),
        silu_mul_(c10::Dispatcher::singleton().findSchemaOrThrow("comptrust::silu_mul", "").typed<SiluMulOp>()) {}

  void add_layer(at::Tensor attn_norm, at::Tensor mlp_norm) {
    layers_.push_back({attn_norm, mlp_norm, {}, {}, {}, {}});
    plan_.reset();
  }

  // The rest of a greedy step (greedy): the token embeddings [vocab, d] and the final norm's weight; the output
  // projection is the "head" part (add_dense / add_op).
  void set_embedding(at::Tensor embedding, at::Tensor final_norm) {
    TORCH_CHECK(embedding.dim() == 2 && embedding.is_contiguous() && final_norm.dim() == 1 &&
                    final_norm.size(0) == embedding.size(1),
                "DecodeProgram.set_embedding: embedding must be contiguous [vocab, d] and final_norm [d], got ",
                embedding.sizes(), " and ", final_norm.sizes());
    embedding_ = std::move(embedding);
    final_norm_ = std::move(final_norm);
    plan_.reset();
  }

  // part: "qkv", "o", "gate_up" or "down" of the last layer added.
  // Dense layers added to one part one after another (q, k, v) become one call, bound together where they can be.
  // A head of one fp32 dense weight gets its greedy screen (screened_argmax.h) here, with the bound product.
  void add_dense(const std::string& part, at::Tensor weight) {
    std::vector<LinearCall>& calls = slot(part);
    if (!calls.empty() && !calls.back().dense_weights().empty()) {
      std::vector<at::Tensor> weights = calls.back().dense_weights();
      weights.push_back(std::move(weight));
      calls.back() = LinearCall::dense(std::move(weights));
    } else {
      calls.push_back(LinearCall::dense({std::move(weight)}));
    }
    if (part == "head" && head_.size() == 1 && head_[0].dense_weights().size() == 1 && head_[0].bound_outputs() == 1)
      head_screen_ = ScreenedArgmax::build(head_[0].dense_weights()[0], nullptr, release_head_pages_);
  }
  // The head weight added next is a view of a clean file mapping (the caller checks: comptrust.memory): its pages are
  // unmapped piece by piece as its screen is built (ScreenedArgmax::build's release_read_pages).
  void release_head_pages_when_screening() { release_head_pages_ = true; }
  // Op calls added to one part one after another (q, k, v) become one call where they bind together.
  void add_op(const std::string& part, const std::string& op_name, std::vector<at::Tensor> tensors,
              std::vector<int64_t> ints) {
    std::vector<LinearCall>& calls = slot(part);
    LinearCall call = LinearCall::boxed(op_name, std::move(tensors), std::move(ints));
    if (calls.empty() || !calls.back().absorb(call)) calls.push_back(std::move(call));
  }
  void add_many(const std::string& part, std::vector<at::Tensor> weights, std::vector<at::Tensor> zeros,
                std::vector<at::Tensor> scales, int64_t bits, int64_t group_size, int64_t act_bits) {
    slot(part).push_back(LinearCall::many(std::move(weights), std::move(zeros), std::move(scales), bits, group_size, act_bits));
  }

  // A whole greedy decode step from the token id at `position`: what LeanDecoder.forward and the argmax after it
  // compute (embedding row, rotary row of the tables [1, max_positions, head_dim], the layers, final norm, output
  // projection; the same ops in the same order), without the ~10 Python-level calls per token, which ran at
  // 70-100 us each here with the caches cold from the weights' stream. Returns the next token's id.
  int64_t greedy(int64_t token, at::Tensor keys, at::Tensor values, const at::Tensor& cos_table,
                 const at::Tensor& sin_table, int64_t position) const {
    TORCH_CHECK(embedding_.defined() && head_.size() == 1,
                "DecodeProgram.greedy: needs set_embedding and one output projection (the \"head\" part)");
    TORCH_CHECK(token >= 0 && token < embedding_.size(0), "DecodeProgram.greedy: token ", token,
                " is outside the vocabulary of ", embedding_.size(0));
    TORCH_CHECK(cos_table.dim() == 3 && sin_table.sizes() == cos_table.sizes() && position >= 0 &&
                    position < cos_table.size(1),
                "DecodeProgram.greedy: position ", position, " is outside the rotary tables ", cos_table.sizes());
    if (const std::optional<FloatPlan> plan = float_plan(keys, values, cos_table, sin_table, position, true)) {
      const int64_t d = plan->width;
      work_.resize(plan->work_floats);
      float* hidden = work_.data() + plan->work_floats - 2 * d - plan->vocab;  // after float_layers' buffers
      float* normed = hidden + d;
      float* logits = normed + d;
      std::copy_n(embedding_.data_ptr<float>() + token * d, d, hidden);
      const float* pending = float_layers(*plan, hidden, keys, values, cos_table.data_ptr<float>() + position * plan->head_dim,
                                          sin_table.data_ptr<float>() + position * plan->head_dim, position);
      residual_rms_norm_f32(hidden, pending, final_norm_.data_ptr<float>(), normed, d, static_cast<float>(eps_));
      if (head_screen_)  // the full projection's argmax from a quarter of its bytes, where it can decide
        if (const std::optional<ScreenedArgmax::Choice> choice = head_screen_->first_argmax(normed))
          return choice->index;
      head_[0].run_bound(normed, &logits);
      return first_argmax_of(logits, plan->vocab);
    }
    const at::Tensor hidden = embedding_.select(0, token).clone().view({1, 1, embedding_.size(1)});
    const at::Tensor pending = step(hidden, std::move(keys), std::move(values), cos_table.narrow(1, position, 1),
                                    sin_table.narrow(1, position, 1), position);
    const at::Tensor last = norm_.call(hidden.select(1, 0), pending.select(1, 0), final_norm_, eps_);
    std::vector<at::Tensor> out;
    head_[0].run(last, out);
    return first_argmax(out[0]);
  }

  // greedy's choice from a final-normed hidden state `normed` [d]: the screen of the head where it decides, else
  // the output projection's first argmax. LeanDecoder picks the token after a prompt this way, so that the one
  // step that is not a greedy call does not read the whole fp32 head either.
  int64_t head_argmax(const at::Tensor& normed) const {
    TORCH_CHECK(embedding_.defined() && head_.size() == 1,
                "DecodeProgram.head_argmax: needs set_embedding and one output projection (the \"head\" part)");
    TORCH_CHECK(normed.dim() == 1 && normed.size(0) == embedding_.size(1) && normed.is_contiguous() &&
                    normed.device().is_cpu(),
                "DecodeProgram.head_argmax: expected a contiguous CPU hidden state [", embedding_.size(1), "], got ",
                normed.sizes());
    if (head_screen_ && normed.scalar_type() == at::kFloat)
      if (const std::optional<ScreenedArgmax::Choice> choice = head_screen_->first_argmax(normed.data_ptr<float>()))
        return choice->index;
    std::vector<at::Tensor> out;
    head_[0].run(normed.view({1, normed.size(0)}), out);
    return first_argmax(out[0]);
  }

  // Whether step and greedy (given fp32 caches and rotary rows of matching shapes) run on raw buffers: an fp32
  // program whose every linear takes its bound product.
  bool float_steps() const {
    if (!plan_) plan_ = program_plan();
    return plan_->has_value();
  }

  // Whether greedy (given fp32 caches and rotary tables of matching shapes) picks its token through the screen of
  // the head (screened_argmax.h): an fp32 program on raw buffers whose head is one fp32 dense weight, on AVX-512 VNNI.
  bool screens_greedy() const { return head_screen_ && float_steps() && (*plan_)->vocab > 0; }

  // One line per linear call, in the order they run: "layer <i> <part>: <layers> bound|op", then "head: ...".
  std::vector<std::string> describe() const {
    std::vector<std::string> lines;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const LayerProgram& layer = layers_[i];
      for (const auto& [part, calls] : {std::pair<const char*, const std::vector<LinearCall>*>{"qkv", &layer.qkv},
                                        {"o", &layer.o}, {"gate_up", &layer.gate_up}, {"down", &layer.down}})
        for (const LinearCall& call : *calls) lines.push_back("layer " + std::to_string(i) + " " + part + ": " + call.describe());
    }
    for (const LinearCall& call : head_) lines.push_back("head: " + call.describe());
    if (head_screen_) {
      char megabytes[32];
      std::snprintf(megabytes, sizeof megabytes, "%.1f", head_screen_->bytes() / 1e6);
      lines.back() += std::string(", greedy screen (int8 copy, ") + megabytes + " MB)";
    }
    return lines;
  }

  // torch.argmax's answer for one row of logits: the first largest value, or the first NaN if there is one
  // (torch's own argmax where the CPU has no AVX-512).
  static int64_t first_argmax(const at::Tensor& logits) {
    TORCH_CHECK(logits.numel() > 0, "DecodeProgram.first_argmax: no logits");
    const at::Tensor row = logits.to(at::kFloat).contiguous();
    return first_argmax_of(row.data_ptr<float>(), row.numel());
  }

  // One token through every layer: hidden [1, 1, d] (the embedded token; updated in place as the residual
  // stream), caches [layers, kv_heads, max_positions, head_dim], cos/sin of `position`. Returns the last
  // layer's MLP output, which the caller adds into hidden with the final norm (as the Python loop does).
  at::Tensor step(at::Tensor hidden, at::Tensor keys, at::Tensor values, at::Tensor cos, at::Tensor sin,
                  int64_t position) const {
    TORCH_CHECK(keys.dim() == 4 && keys.size(0) == static_cast<int64_t>(layers_.size()) &&
                    values.sizes() == keys.sizes(),
                "DecodeProgram.step: caches must be [", layers_.size(), ", kv_heads, max_positions, head_dim], got ",
                keys.sizes(), " and ", values.sizes());
    const std::optional<FloatPlan> plan = float_plan(keys, values, cos, sin, position, false);
    if (plan && hidden.scalar_type() == at::kFloat && hidden.is_contiguous() && hidden.numel() == plan->width) {
      work_.resize(plan->work_floats);
      const float* last = float_layers(*plan, hidden.data_ptr<float>(), keys, values, cos.data_ptr<float>(),
                                       sin.data_ptr<float>(), position);
      at::Tensor pending = at::empty_like(hidden);
      std::copy_n(last, plan->width, pending.data_ptr<float>());
      return pending;
    }
    std::optional<at::Tensor> pending;
    std::vector<at::Tensor> out;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const LayerProgram& layer = layers_[i];
      TORCH_CHECK(!layer.qkv.empty() && !layer.o.empty() && !layer.gate_up.empty() && !layer.down.empty(),
                  "DecodeProgram.step: layer ", i, " is missing a linear");
      at::Tensor normed = norm_.call(hidden, pending, layer.attn_norm, eps_);
      run_all(layer.qkv, normed, out, 3, i, "qkv");
      at::Tensor key_cache = keys.select(0, static_cast<int64_t>(i));
      at::Tensor value_cache = values.select(0, static_cast<int64_t>(i));
      const at::Tensor attended = attention_.call(out[0], out[1], out[2], key_cache, value_cache, cos, sin, position, scale_);
      run_all(layer.o, attended, out, 1, i, "o");
      normed = norm_.call(hidden, out[0], layer.mlp_norm, eps_);
      run_all(layer.gate_up, normed, out, 2, i, "gate_up");
      const at::Tensor act = silu_mul_.call(out[0], out[1]);
      run_all(layer.down, act, out, 1, i, "down");
      pending = out[0];
    }
    TORCH_CHECK(pending.has_value(), "DecodeProgram.step: no layers");
    return *pending;
  }

 private:
  // An fp32 step whose every linear takes its bound product runs on raw pointers into work_ (float_layers): no op
  // calls and no tensors, the same kernels in the same order. The program's side of that (widths, bound calls,
  // fp32 norms) is worked out once, after the last add_*; the caches' and rotary rows' side on each call.
  struct FloatPlan {
    int64_t width = 0, queries = 0, kv_width = 0, ffn = 0;  // d; q, k/v and gate/up widths
    int64_t vocab = 0;                                       // the head's width where greedy can run this way, else 0
    int64_t heads = 0, kv_heads = 0, max_len = 0, head_dim = 0;  // from the caches, per call
    int64_t work_floats = 0;  // normed, q, k, v, attended, o, gate, up, act, down; then hidden, normed, logits
  };

  // The output widths of a part whose calls all take their bound product on rows of k; empty otherwise.
  static std::vector<int64_t> bound_part_widths(const std::vector<LinearCall>& calls, int64_t k) {
    std::vector<int64_t> widths;
    for (const LinearCall& call : calls) {
      const std::vector<int64_t> w = call.bound_widths(k);
      if (w.empty()) return {};
      widths.insert(widths.end(), w.begin(), w.end());
    }
    return widths;
  }

  static bool fp32_contiguous(const at::Tensor& t) {
    return t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous();
  }

  std::optional<FloatPlan> program_plan() const {
    if (layers_.empty()) return std::nullopt;
    FloatPlan plan;
    plan.width = layers_[0].attn_norm.numel();
    const std::vector<int64_t> qkv = bound_part_widths(layers_[0].qkv, plan.width);
    const std::vector<int64_t> gate_up = bound_part_widths(layers_[0].gate_up, plan.width);
    if (qkv.size() != 3 || qkv[1] != qkv[2] || gate_up.size() != 2 || gate_up[0] != gate_up[1]) return std::nullopt;
    plan.queries = qkv[0];
    plan.kv_width = qkv[1];
    plan.ffn = gate_up[0];
    const std::vector<int64_t> width{plan.width};
    for (const LayerProgram& layer : layers_) {
      const bool ok = fp32_contiguous(layer.attn_norm) && fp32_contiguous(layer.mlp_norm) &&
                      layer.attn_norm.numel() == plan.width && layer.mlp_norm.numel() == plan.width &&
                      bound_part_widths(layer.qkv, plan.width) == qkv && bound_part_widths(layer.o, plan.queries) == width &&
                      bound_part_widths(layer.gate_up, plan.width) == gate_up &&
                      bound_part_widths(layer.down, plan.ffn) == width;
      if (!ok) return std::nullopt;
    }
    if (head_.size() == 1 && fp32_contiguous(embedding_) && fp32_contiguous(final_norm_) &&
        embedding_.size(1) == plan.width) {
      const std::vector<int64_t> head = bound_part_widths(head_, plan.width);
      if (head.size() == 1) plan.vocab = head[0];
    }
    plan.work_floats = 5 * plan.width + 2 * plan.queries + 2 * plan.kv_width + 3 * plan.ffn + plan.vocab;
    return plan;
  }

  // The plan for caches [layers, kv_heads, max_len, head_dim] and rotary rows (greedy: tables [1, max_positions,
  // head_dim]) of these shapes, or nullopt where the op path must run (and raise what the ops raise).
  std::optional<FloatPlan> float_plan(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& cos,
                                      const at::Tensor& sin, int64_t position, bool greedy) const {
    if (!plan_) plan_ = program_plan();
    if (!plan_->has_value() || (greedy && (*plan_)->vocab == 0)) return std::nullopt;
    FloatPlan plan = **plan_;
    if (!fp32_contiguous(keys) || !fp32_contiguous(values) || !fp32_contiguous(cos) || !fp32_contiguous(sin) ||
        keys.dim() != 4 || keys.size(0) != static_cast<int64_t>(layers_.size()) || values.sizes() != keys.sizes())
      return std::nullopt;
    plan.kv_heads = keys.size(1);
    plan.max_len = keys.size(2);
    plan.head_dim = keys.size(3);
    const bool shapes = plan.head_dim > 0 && plan.head_dim % 2 == 0 && plan.kv_heads * plan.head_dim == plan.kv_width &&
                        plan.queries % plan.kv_width == 0 && position >= 0 && position < plan.max_len &&
                        sin.sizes() == cos.sizes() &&
                        (greedy ? cos.size(0) == 1 && cos.size(2) == plan.head_dim : cos.numel() == plan.head_dim);
    if (!shapes) return std::nullopt;
    plan.heads = plan.queries / plan.head_dim;
    return plan;
  }

  // Every layer on hidden (d floats, updated in place as step's residual stream) with the rotary row cos/sin of
  // `position`: step's ops on raw pointers. Returns the last layer's MLP output (in work_).
  const float* float_layers(const FloatPlan& plan, float* hidden, const at::Tensor& keys, const at::Tensor& values,
                            const float* cos, const float* sin, int64_t position) const {
    const int64_t d = plan.width;  // work_ holds plan.work_floats (the caller resized it)
    float* normed = work_.data();
    float* q = normed + d;
    float* k = q + plan.queries;
    float* v = k + plan.kv_width;
    float* attended = v + plan.kv_width;
    float* o = attended + plan.queries;
    float* gate = o + d;
    float* up = gate + plan.ffn;
    float* act = up + plan.ffn;
    float* down = act + plan.ffn;
    float* const qkv_out[] = {q, k, v};
    float* const gate_up_out[] = {gate, up};
    const int64_t cache_floats = plan.kv_heads * plan.max_len * plan.head_dim;
    const auto eps = static_cast<float>(eps_);
    for (size_t i = 0; i < layers_.size(); ++i) {
      const LayerProgram& layer = layers_[i];
      residual_rms_norm_f32(hidden, i ? down : nullptr, layer.attn_norm.data_ptr<float>(), normed, d, eps);
      run_bound_part(layer.qkv, normed, qkv_out);
      decode_attention_f32(q, k, v, keys.data_ptr<float>() + i * cache_floats, values.data_ptr<float>() + i * cache_floats,
                           cos, sin, plan.heads, plan.kv_heads, plan.max_len, plan.head_dim, position,
                           static_cast<float>(scale_), attended);
      run_bound_part(layer.o, attended, &o);
      residual_rms_norm_f32(hidden, o, layer.mlp_norm.data_ptr<float>(), normed, d, eps);
      run_bound_part(layer.gate_up, normed, gate_up_out);
      silu_mul_f32(gate, up, act, plan.ffn);
      run_bound_part(layer.down, act, &down);
    }
    return down;
  }

  static void run_bound_part(const std::vector<LinearCall>& calls, const float* x, float* const* outputs) {
    for (const LinearCall& call : calls) {
      call.run_bound(x, outputs);
      outputs += call.bound_outputs();
    }
  }

  std::vector<LinearCall>& slot(const std::string& part) {
    plan_.reset();  // a linear is about to change
    if (part == "head") {
      head_screen_.reset();  // add_dense builds it again where the head stays one fp32 dense weight
      return head_;
    }
    TORCH_CHECK(!layers_.empty(), "DecodeProgram: add_layer before its linears");
    LayerProgram& layer = layers_.back();
    if (part == "qkv") return layer.qkv;
    if (part == "o") return layer.o;
    if (part == "gate_up") return layer.gate_up;
    if (part == "down") return layer.down;
    TORCH_CHECK(false, "DecodeProgram: unknown part '", part, "' (qkv, o, gate_up, down or head)");
  }

  static void run_all(const std::vector<LinearCall>& calls, const at::Tensor& x, std::vector<at::Tensor>& out,
                      size_t expected, size_t layer, const char* part) {
    out.clear();
    for (const LinearCall& call : calls) call.run(x, out);
    TORCH_CHECK(out.size() == expected, "DecodeProgram.step: layer ", layer, "'s ", part, " gave ", out.size(),
                " outputs, expected ", expected);
  }

  double eps_, scale_;
  std::vector<LayerProgram> layers_;
  std::vector<LinearCall> head_;  // the output projection
  std::shared_ptr<const ScreenedArgmax> head_screen_;  // greedy's screen of a dense fp32 head, where it can run
  bool release_head_pages_ = false;
  at::Tensor embedding_, final_norm_;
  c10::TypedOperatorHandle<NormOp> norm_;
  c10::TypedOperatorHandle<AttentionOp> attention_;
  c10::TypedOperatorHandle<SiluMulOp> silu_mul_;
  // float_plan's program side (reset by every add_*), and float_layers' buffers: a program runs one step at a time.
  mutable std::optional<std::optional<FloatPlan>> plan_;
  mutable std::vector<float> work_;
};

}  // namespace
}  // namespace comptrust::cpu

TORCH_LIBRARY_FRAGMENT(comptrust, m) {
  using comptrust::cpu::DecodeProgram;
  m.class_<DecodeProgram>("DecodeProgram")
      .def(torch::init<double, double>())
      .def("add_layer", &DecodeProgram::add_layer)
      .def("add_dense", &DecodeProgram::add_dense)
      .def("add_op", &DecodeProgram::add_op)
      .def("add_many", &DecodeProgram::add_many)
      .def("set_embedding", &DecodeProgram::set_embedding)
      .def("release_head_pages_when_screening", &DecodeProgram::release_head_pages_when_screening)
      .def("step", &DecodeProgram::step)
      .def("greedy", &DecodeProgram::greedy)
      .def("head_argmax", &DecodeProgram::head_argmax)
      .def("describe", &DecodeProgram::describe)
      .def("float_steps", &DecodeProgram::float_steps)
      .def("screens_greedy", &DecodeProgram::screens_greedy)
      .def_static("first_argmax", &DecodeProgram::first_argmax);
}
