// Quiver's CPU kernels for routed LoRA layers (float32), registered as the CPU side of the
// quiver:: custom ops that ops.py defines (kernels.py builds this file against torch's headers and
// loads it with torch.ops.load_library).
//
// Built with OpenMP: the OpenMP runtime it links (libgomp.so.1) is the one torch has already
// loaded, so the kernels run on torch's own thread pool.
//
// Layouts: x [n, din], out [n, dout], a [experts, rank, din] (each expert's A),
// b [experts, rank, dout] (each expert's scaled B, transposed), index and weights [n, k], and
// Arrow's prototypes as a panel [ceil(experts / 16), din, 16]: groups of 16 experts, column by
// column, zero past the last expert (ops.prototype_panel), so a score tile reads one stream.

#if defined(__clang__) || !defined(__GNUC__)
#error "Quiver's kernels need GCC (g++): they run on torch's GNU OpenMP threads (libgomp)"
#endif

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

typedef float f8 __attribute__((vector_size(32)));
typedef int i8 __attribute__((vector_size(32)));

inline f8 load8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store8(float* p, f8 v) { std::memcpy(p, &v, sizeof v); }

// Factors are read in column blocks of this many floats, so that an expert's block (8 rank rows,
// 16 KiB) stays in L1 while every token that chose the expert uses it.
constexpr int64_t kBlock = 512;

// The eight lane sums of eight vectors, as one vector: a transpose-and-add in three rounds.
inline f8 lane_sums(const f8* v) {
  const i8 even = {0, 8, 2, 10, 4, 12, 6, 14}, odd = {1, 9, 3, 11, 5, 13, 7, 15};
  const i8 low_pairs = {0, 1, 8, 9, 4, 5, 12, 13}, high_pairs = {2, 3, 10, 11, 6, 7, 14, 15};
  const i8 low_half = {0, 1, 2, 3, 8, 9, 10, 11}, high_half = {4, 5, 6, 7, 12, 13, 14, 15};
  f8 pairs[4], quads[2];
  for (int j = 0; j < 4; ++j)
    pairs[j] = __builtin_shuffle(v[2 * j], v[2 * j + 1], even) +
               __builtin_shuffle(v[2 * j], v[2 * j + 1], odd);
  for (int j = 0; j < 2; ++j)
    quads[j] = __builtin_shuffle(pairs[2 * j], pairs[2 * j + 1], low_pairs) +
               __builtin_shuffle(pairs[2 * j], pairs[2 * j + 1], high_pairs);
  return __builtin_shuffle(quads[0], quads[1], low_half) +
         __builtin_shuffle(quads[0], quads[1], high_half);
}

// codes[j] += a[j, :width] . x[:width] for RB rows of a (row stride `stride`) at once: RB
// independent accumulators hide the FMA latency.
template <int RB>
inline void dots(const float* a, int64_t stride, int64_t width, const float* x, float* codes) {
  f8 acc[RB] = {};
  int64_t i = 0;
  for (; i + 8 <= width; i += 8) {
    const f8 xv = load8(x + i);
    for (int j = 0; j < RB; ++j) acc[j] += load8(a + j * stride + i) * xv;
  }
  float sums[RB];
  if constexpr (RB == 8) {
    store8(sums, lane_sums(acc));
  } else {
    for (int j = 0; j < RB; ++j) {
      sums[j] = 0.f;
      for (int lane = 0; lane < 8; ++lane) sums[j] += acc[j][lane];
    }
  }
  for (int j = 0; j < RB; ++j) {
    for (int64_t tail = i; tail < width; ++tail) sums[j] += a[j * stride + tail] * x[tail];
    codes[j] += sums[j];
  }
}

// out[:width] += sum_j codes[j] * b[j, :width] for RB rows of b at once (one load and store of
// out per RB rows; even and odd rows in two chains to halve the FMA latency on the path).
template <int RB>
inline void expand(const float* b, int64_t stride, int64_t width, const float* codes, float* out) {
  f8 c[RB];  // broadcast once: out may alias codes as far as the compiler knows
  for (int j = 0; j < RB; ++j) c[j] = f8{} + codes[j];
  int64_t o = 0;
  for (; o + 8 <= width; o += 8) {
    f8 even = load8(out + o), odd = {};
    for (int j = 0; j + 1 < RB; j += 2) {
      even += c[j] * load8(b + j * stride + o);
      odd += c[j + 1] * load8(b + (j + 1) * stride + o);
    }
    if constexpr (RB % 2 == 1) even += c[RB - 1] * load8(b + (RB - 1) * stride + o);
    store8(out + o, even + odd);
  }
  for (; o < width; ++o) {
    float sum = out[o];
    for (int j = 0; j < RB; ++j) sum += codes[j] * b[j * stride + o];
    out[o] = sum;
  }
}

// Any rank, in blocks of 8, then 4, then single rows.
inline void all_dots(const float* a, int64_t stride, int64_t width, int64_t rank, const float* x,
                     float* codes) {
  int64_t j = 0;
  for (; j + 8 <= rank; j += 8) dots<8>(a + j * stride, stride, width, x, codes + j);
  for (; j + 4 <= rank; j += 4) dots<4>(a + j * stride, stride, width, x, codes + j);
  for (; j < rank; ++j) dots<1>(a + j * stride, stride, width, x, codes + j);
}

inline void all_expands(const float* b, int64_t stride, int64_t width, int64_t rank,
                        const float* codes, float* out) {
  int64_t j = 0;
  for (; j + 8 <= rank; j += 8) expand<8>(b + j * stride, stride, width, codes + j, out);
  for (; j + 4 <= rank; j += 4) expand<4>(b + j * stride, stride, width, codes + j, out);
  for (; j < rank; ++j) expand<1>(b + j * stride, stride, width, codes + j, out);
}

// Experts per score tile: two vectors, so a tile of kTileTokens tokens keeps 12 accumulators, the
// two panel vectors and a broadcast in AVX2's 16 registers.
constexpr int64_t kTileExperts = 16;
constexpr int kTileTokens = 6;
constexpr int64_t kSumBlock = 128;

// products[t, 0:16] += panel_g^T x[t] over columns [0, width) for T tokens: an outer product per
// column i (the panel row against each token's x[t, i] broadcast), as GEMM micro-kernels do.
template <int T>
inline void score_tile(const float* panel, const float* x, int64_t din, int64_t width,
                       float* products, int64_t stride) {
  f8 acc[T][2] = {};
  for (int64_t i = 0; i < width; ++i) {
    const f8 low = load8(panel + i * kTileExperts), high = load8(panel + i * kTileExperts + 8);
    for (int t = 0; t < T; ++t) {
      const f8 xv = f8{} + x[t * din + i];
      acc[t][0] += xv * low;
      acc[t][1] += xv * high;
    }
  }
  for (int t = 0; t < T; ++t) {
    store8(products + t * stride, load8(products + t * stride) + acc[t][0]);
    store8(products + t * stride + 8, load8(products + t * stride + 8) + acc[t][1]);
  }
}

// Each group's tile over columns in blocks of kSumBlock, summed block by block: float error grows
// with the block, not with din.
template <int T>
inline void score_tiles(const float* panel, int64_t groups, const float* x, int64_t din,
                        float* products, int64_t stride) {
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t i0 = 0; i0 < din; i0 += kSumBlock)
      score_tile<T>(panel + (g * din + i0) * kTileExperts, x + i0, din,
                    std::min(kSumBlock, din - i0), products + g * kTileExperts, stride);
}

// Arrow's scores of a chunk of tokens x [tokens, din]: scores[e, t] = |prototypes[e] . x[t]|,
// expert-major, from the packed panel. Six tokens at a time against every expert group, so the
// tokens stay in L1 while the panel streams; products is scratch [tokens, groups * 16].
void chunk_scores(const float* panel, const float* x, int64_t tokens, int64_t din,
                  int64_t experts, float* products, float* scores) {
  const int64_t groups = (experts + kTileExperts - 1) / kTileExperts;
  const int64_t stride = groups * kTileExperts;
  std::fill(products, products + tokens * stride, 0.f);
  int64_t t = 0;
  for (; t + kTileTokens <= tokens; t += kTileTokens)
    score_tiles<kTileTokens>(panel, groups, x + t * din, din, products + t * stride, stride);
  for (; t < tokens; ++t)
    score_tiles<1>(panel, groups, x + t * din, din, products + t * stride, stride);
  for (int64_t row = 0; row < tokens; ++row)
    for (int64_t e = 0; e < experts; ++e)
      scores[e * tokens + row] = std::fabs(products[row * stride + e]);
}

// Arrow's choice for each of `tokens` rows, eight at once, one per vector lane: the k largest
// scores [experts, tokens] (descending; the lower expert first on ties) and their softmax over
// temperature. Each expert is inserted into every lane's sorted list without a branch; best and
// best_experts hold the k lists.
void top_k_softmax(const float* scores, int64_t tokens, int64_t experts, int64_t k,
                   float temperature, int64_t* index, float* weights, f8* best,
                   i8* best_experts) {
  for (int64_t t = 0; t < tokens; t += 8) {
    const int64_t lanes = std::min<int64_t>(8, tokens - t);
    for (int64_t j = 0; j < k; ++j) best[j] = f8{} - INFINITY, best_experts[j] = i8{} + int(j);
    for (int64_t e = 0; e < experts; ++e) {
      f8 value = {};
      if (lanes == 8)
        value = load8(scores + e * tokens + t);
      else
        for (int64_t lane = 0; lane < lanes; ++lane) value[lane] = scores[e * tokens + t + lane];
      i8 expert = i8{} + int(e);
      for (int64_t j = 0; j < k; ++j) {  // where value beats best[j], they swap places
        const i8 beats = value > best[j];
        const f8 kept = beats ? value : best[j];
        const i8 kept_expert = beats ? expert : best_experts[j];
        value = beats ? best[j] : value;
        expert = beats ? best_experts[j] : expert;
        best[j] = kept;
        best_experts[j] = kept_expert;
      }
    }
    for (int64_t lane = 0; lane < lanes; ++lane) {
      float* w = weights + (t + lane) * k;
      float total = 0.f;
      for (int64_t j = 0; j < k; ++j) {
        index[(t + lane) * k + j] = best_experts[j][lane];
        w[j] = std::exp((best[j][lane] - best[0][lane]) / temperature);
        total += w[j];
      }
      for (int64_t j = 0; j < k; ++j) w[j] /= total;
    }
  }
}

// visit(e, offset, width, pair) for each expert's pairs (pairs[start[e] .. start[e + 1])), one
// column block [offset, offset + width) of `dim` at a time, so the block stays in cache.
template <typename Visit>
inline void by_expert_blocks(int64_t experts, int64_t dim, const int64_t* start,
                             const int64_t* pairs, Visit visit) {
  for (int64_t e = 0; e < experts; ++e)
    for (int64_t offset = 0; offset < dim; offset += kBlock)
      for (int64_t s = start[e]; s < start[e + 1]; ++s)
        visit(e, offset, std::min(kBlock, dim - offset), pairs[s]);
}

// out[t] += sum_j w_tj b_e^T (a_e x_t) with e = index[t, j] (output mixing), or
// out[t] += sum_j w_tj b_e^T (sum_i w_ti a_i x_t) (parameter mixing).
// With a prototype `panel`, Arrow first fills index and weights (top-k of |p_e . x_t|,
// softmax at temperature); without, they are given and checked. Tokens are split into chunks;
// within a chunk the (token, expert) pairs are visited expert by expert so each expert's factors
// stay in cache. Returns -1 (writing nothing) if a given index is out of range.
int lowrank_add(float* out, const float* x, const float* a, const float* b,
                       const float* panel, float temperature, int64_t* index,
                       float* weights, int64_t n, int64_t din, int64_t dout, int64_t experts,
                       int64_t rank, int64_t k, int mix_parameters, int64_t chunk) {
  if (panel == nullptr)
    for (int64_t p = 0; p < n * k; ++p)
      if (index[p] < 0 || index[p] >= experts) return -1;
  const int64_t chunks = (n + chunk - 1) / chunk;
  const int64_t padded = (experts + kTileExperts - 1) / kTileExperts * kTileExperts;
#pragma omp parallel if (chunks > 1)
  {
    std::vector<float> codes(chunk * k * rank), mixed(rank), products(chunk * padded),
        scores(chunk * experts);
    std::vector<f8> best(k);
    std::vector<i8> best_experts(k);
    std::vector<int64_t> start(experts + 1), fill(experts), pairs(chunk * k);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t t0 = c * chunk, t1 = std::min(n, t0 + chunk), pair_count = (t1 - t0) * k;
      if (panel != nullptr) {
        chunk_scores(panel, x + t0 * din, t1 - t0, din, experts, products.data(),
                     scores.data());
        top_k_softmax(scores.data(), t1 - t0, experts, k, temperature, index + t0 * k,
                      weights + t0 * k, best.data(), best_experts.data());
      }
      const int64_t* chosen = index + t0 * k;
      const float* chosen_weights = weights + t0 * k;
      // Counting sort of this chunk's pairs by expert: expert e's pairs are
      // pairs[start[e] .. start[e + 1]).
      std::fill(start.begin(), start.end(), 0);
      for (int64_t p = 0; p < pair_count; ++p) ++start[chosen[p] + 1];
      for (int64_t e = 0; e < experts; ++e) start[e + 1] += start[e];
      std::copy(start.begin(), start.end() - 1, fill.begin());
      for (int64_t p = 0; p < pair_count; ++p) pairs[fill[chosen[p]]++] = p;

      std::fill(codes.begin(), codes.end(), 0.f);
      by_expert_blocks(experts, din, start.data(), pairs.data(),
                       [&](int64_t e, int64_t i0, int64_t width, int64_t p) {
                         const float* x_t = x + (t0 + p / k) * din + i0;
                         const float* a_e = a + e * rank * din + i0;
                         all_dots(a_e, din, width, rank, x_t, &codes[p * rank]);
                       });
      for (int64_t t = 0; t < pair_count / k; ++t) {
        float* token_codes = &codes[t * k * rank];
        const float* w = chosen_weights + t * k;
        if (mix_parameters) {
          std::fill(mixed.begin(), mixed.end(), 0.f);
          for (int64_t j = 0; j < k; ++j)
            for (int64_t r = 0; r < rank; ++r) mixed[r] += w[j] * token_codes[j * rank + r];
          for (int64_t j = 0; j < k; ++j)
            for (int64_t r = 0; r < rank; ++r) token_codes[j * rank + r] = w[j] * mixed[r];
        } else {
          for (int64_t j = 0; j < k; ++j)
            for (int64_t r = 0; r < rank; ++r) token_codes[j * rank + r] *= w[j];
        }
      }
      by_expert_blocks(experts, dout, start.data(), pairs.data(),
                       [&](int64_t e, int64_t o0, int64_t width, int64_t p) {
                         float* out_t = out + (t0 + p / k) * dout + o0;
                         const float* b_e = b + e * rank * dout + o0;
                         all_expands(b_e, dout, width, rank, &codes[p * rank], out_t);
                       });
    }
  }
  return 0;
}


// Tokens per work item: one chunk per thread when that fits in kMaxChunk tokens, since the larger
// a chunk, the more of its (token, expert) pairs share each expert's factors; at most kMaxChunk,
// so a chunk's inputs stay in L2 while its pairs reuse factors.
constexpr int64_t kMaxChunk = 256;

int64_t chunk_tokens(int64_t tokens) {
  const int64_t threads = at::get_num_threads();
  const int64_t per_thread = (tokens + threads - 1) / threads;
  return std::min(kMaxChunk, std::max<int64_t>(8, (per_thread + 7) / 8 * 8));
}

// Off while kernels.py says the kernels are off (QUIVER_KERNELS=0 after they were loaded).
std::atomic<bool> enabled{true};

bool is(const at::Tensor& t, at::ScalarType type, at::IntArrayRef shape) {
  return t.is_cpu() && t.scalar_type() == type && t.sizes() == shape;
}

// Whether out, x and the factors are what the kernel reads: CPU float32 tensors of matching shapes.
bool factors_fit(const at::Tensor& out, const at::Tensor& x, const at::Tensor& a,
                 const at::Tensor& b, int64_t rank) {
  if (!enabled || x.dim() != 2 || out.dim() != 2 || a.dim() != 2 || rank < 1 ||
      a.size(0) % rank != 0 || !out.is_contiguous())
    return false;
  const int64_t tokens = x.size(0), din = x.size(1), dout = out.size(1), rows = a.size(0);
  return is(x, at::kFloat, {tokens, din}) && is(out, at::kFloat, {tokens, dout}) &&
         is(a, at::kFloat, {rows, din}) && is(b, at::kFloat, {rows, dout});
}

bool choice_fits(const at::Tensor& x, const at::Tensor& index, const at::Tensor& weights) {
  return index.dim() == 2 && is(index, at::kLong, {x.size(0), index.size(1)}) &&
         is(weights, at::kFloat, {x.size(0), index.size(1)});
}

bool arrow_fits(const at::Tensor& x, const at::Tensor& prototypes, const at::Tensor& panel,
                int64_t experts, int64_t top_k, double temperature) {
  const int64_t groups = (experts + kTileExperts - 1) / kTileExperts;
  return top_k >= 1 && top_k <= experts && temperature > 0 &&
         is(prototypes, at::kFloat, {experts, x.size(1)}) &&
         is(panel, at::kFloat, {groups, x.size(1), kTileExperts});
}

// lowrank_add on tensors that fit (see lowrank_add's comment for index and weights).
int run(const at::Tensor& out, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
        const float* panel, double temperature, const at::Tensor& index,
        const at::Tensor& weights, int64_t rank, bool mix_parameters) {
  const at::Tensor xs = x.contiguous(), as = a.contiguous(), bs = b.contiguous();
  const at::Tensor indices = index.contiguous(), ws = weights.contiguous();
  const int64_t n = x.size(0);
  return lowrank_add(out.data_ptr<float>(), xs.data_ptr<float>(), as.data_ptr<float>(),
                     bs.data_ptr<float>(), panel, static_cast<float>(temperature),
                     indices.data_ptr<int64_t>(), ws.data_ptr<float>(), n, x.size(1),
                     out.size(1), a.size(0) / rank, rank, index.size(1), mix_parameters,
                     chunk_tokens(n));
}

// The keys below BackendSelect: the device's own kernel (ops.py's portable one).
c10::DispatchKeySet past(c10::DispatchKeySet keys) {
  using c10::DispatchKeySet;
  return keys & DispatchKeySet(DispatchKeySet::FULL_AFTER, c10::DispatchKey::BackendSelect);
}

void lowrank_add_op(c10::DispatchKeySet keys, const at::Tensor& out, const at::Tensor& x,
                    const at::Tensor& a_rows, const at::Tensor& b_rows, const at::Tensor& index,
                    const at::Tensor& weights, int64_t rank, bool mix_parameters) {
  if (!factors_fit(out, x, a_rows, b_rows, rank) || !choice_fits(x, index, weights)) {
    static const auto portable =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("quiver::lowrank_add_", "")
            .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool)>();
    return portable.redispatch(past(keys), out, x, a_rows, b_rows, index, weights, rank,
                               mix_parameters);
  }
  const int status = run(out, x, a_rows, b_rows, nullptr, 0.0, index, weights, rank,
                         mix_parameters);
  TORCH_CHECK_INDEX(status == 0, "quiver::lowrank_add_: an expert index is outside 0..",
                    a_rows.size(0) / rank - 1);
}

std::tuple<at::Tensor, at::Tensor> arrow_add_op(
    c10::DispatchKeySet keys, const at::Tensor& out, const at::Tensor& x,
    const at::Tensor& prototypes, const at::Tensor& panel, const at::Tensor& a_rows,
    const at::Tensor& b_rows, int64_t top_k, double temperature, int64_t rank,
    bool mix_parameters) {
  if (!factors_fit(out, x, a_rows, b_rows, rank) ||
      !arrow_fits(x, prototypes, panel, a_rows.size(0) / rank, top_k, temperature)) {
    static const auto portable =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("quiver::arrow_add_", "")
            .typed<std::tuple<at::Tensor, at::Tensor>(
                const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                const at::Tensor&, const at::Tensor&, int64_t, double, int64_t, bool)>();
    return portable.redispatch(past(keys), out, x, prototypes, panel, a_rows, b_rows, top_k,
                               temperature, rank, mix_parameters);
  }
  at::Tensor index = at::empty({x.size(0), top_k}, x.options().dtype(at::kLong));
  at::Tensor weights = at::empty({x.size(0), top_k}, x.options());
  const at::Tensor panel_ = panel.contiguous();
  run(out, x, a_rows, b_rows, panel_.data_ptr<float>(), temperature, index, weights, rank,
      mix_parameters);
  return {index, weights};
}

}  // namespace

// For kernels.py (through ctypes): turn the fused path on or off.
extern "C" void quiver_use_kernels(int on) { enabled = on != 0; }

// Registered at BackendSelect, the key every call passes between the fake, functionalization and
// autograd keys (which see it first) and the device's kernel: calls that fit run the fused kernel;
// every other call (another device or dtype, shapes that do not fit) goes on to the portable
// implementation, whose checks raise a RoutingError before anything is written.
TORCH_LIBRARY_IMPL(quiver, BackendSelect, m) {
  m.impl("lowrank_add_", &lowrank_add_op);
  m.impl("arrow_add_", &arrow_add_op);
}
