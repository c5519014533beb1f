// Quiver's CPU kernels for routed LoRA layers (float32), called through ctypes by kernels.py.
//
// Built with OpenMP and no torch headers: the OpenMP runtime they link (libgomp.so.1) is the one
// torch has already loaded, so they run on torch's own thread pool.
//
// Layouts: x [n, din], out [n, dout], a [experts, rank, din] (each expert's A),
// b [experts, rank, dout] (each expert's scaled B, transposed), index and weights [n, k].

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

typedef float f8 __attribute__((vector_size(32)));

inline f8 load8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store8(float* p, f8 v) { std::memcpy(p, &v, sizeof v); }

// codes[j] = a[j, :] . x for RB rows of a at once: RB independent accumulators hide FMA latency.
template <int RB>
inline void dots(const float* a, int64_t din, const float* x, float* codes) {
  f8 acc[RB] = {};
  int64_t i = 0;
  for (; i + 8 <= din; i += 8) {
    const f8 xv = load8(x + i);
    for (int j = 0; j < RB; ++j) acc[j] += load8(a + j * din + i) * xv;
  }
  for (int j = 0; j < RB; ++j) {
    float sum = 0.f;
    for (int lane = 0; lane < 8; ++lane) sum += acc[j][lane];
    for (int64_t tail = i; tail < din; ++tail) sum += a[j * din + tail] * x[tail];
    codes[j] = sum;
  }
}

// out += sum_j codes[j] * b[j, :] for RB rows of b at once (one load and store of out per RB).
template <int RB>
inline void expand(const float* b, int64_t dout, const float* codes, float* out) {
  int64_t o = 0;
  for (; o + 8 <= dout; o += 8) {
    f8 acc = load8(out + o);
    for (int j = 0; j < RB; ++j) acc += codes[j] * load8(b + j * dout + o);
    store8(out + o, acc);
  }
  for (; o < dout; ++o) {
    float sum = out[o];
    for (int j = 0; j < RB; ++j) sum += codes[j] * b[j * dout + o];
    out[o] = sum;
  }
}

// Any rank, in blocks of 8, then 4, then single rows.
inline void all_dots(const float* a, int64_t din, int64_t rank, const float* x, float* codes) {
  int64_t j = 0;
  for (; j + 8 <= rank; j += 8) dots<8>(a + j * din, din, x, codes + j);
  for (; j + 4 <= rank; j += 4) dots<4>(a + j * din, din, x, codes + j);
  for (; j < rank; ++j) dots<1>(a + j * din, din, x, codes + j);
}

inline void all_expands(const float* b, int64_t dout, int64_t rank, const float* codes,
                        float* out) {
  int64_t j = 0;
  for (; j + 8 <= rank; j += 8) expand<8>(b + j * dout, dout, codes + j, out);
  for (; j + 4 <= rank; j += 4) expand<4>(b + j * dout, dout, codes + j, out);
  for (; j < rank; ++j) expand<1>(b + j * dout, dout, codes + j, out);
}

}  // namespace

extern "C" {

// Per row: the k largest |scores| (descending), and the softmax of those k over temperature.
void quiver_topk_softmax(const float* scores, int64_t n, int64_t experts, int64_t k,
                         float temperature, int64_t* index, float* weights) {
#pragma omp parallel if (n * experts >= 4096)
  {
    std::vector<float> best(k);
    std::vector<int64_t> position(k);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n; ++t) {
      const float* row = scores + t * experts;
      int64_t filled = 0;
      for (int64_t e = 0; e < experts; ++e) {
        const float value = std::fabs(row[e]);
        if (filled == k && !(value > best[k - 1])) continue;
        int64_t p = filled < k ? filled++ : k - 1;
        for (; p > 0 && best[p - 1] < value; --p) {
          best[p] = best[p - 1];
          position[p] = position[p - 1];
        }
        best[p] = value;
        position[p] = e;
      }
      float total = 0.f;
      for (int64_t j = 0; j < k; ++j) {
        const float w = std::exp((best[j] - best[0]) / temperature);
        weights[t * k + j] = w;
        total += w;
      }
      for (int64_t j = 0; j < k; ++j) {
        weights[t * k + j] /= total;
        index[t * k + j] = position[j];
      }
    }
  }
}

// out[t] += sum_j w_tj b_e^T (a_e x_t) with e = index[t, j] (output mixing), or
// out[t] += sum_j w_tj b_e^T (sum_i w_ti a_i x_t) (parameter mixing). Tokens are split into
// chunks; within a chunk the (token, expert) pairs are visited expert by expert so each expert's
// factors stay in cache. Returns -1 if an index is out of range (and then writes nothing).
int quiver_lowrank_add(float* out, const float* x, const float* a, const float* b,
                       const int64_t* index, const float* weights, int64_t n, int64_t din,
                       int64_t dout, int64_t experts, int64_t rank, int64_t k,
                       int mix_parameters, int64_t chunk) {
  for (int64_t p = 0; p < n * k; ++p)
    if (index[p] < 0 || index[p] >= experts) return -1;
  const int64_t chunks = (n + chunk - 1) / chunk;
#pragma omp parallel if (chunks > 1)
  {
    std::vector<float> codes(chunk * k * rank), mixed(rank);
    std::vector<int64_t> start(experts + 1), pairs(chunk * k);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t t0 = c * chunk, pair_count = (std::min(n, t0 + chunk) - t0) * k;
      const int64_t* chosen = index + t0 * k;
      const float* chosen_weights = weights + t0 * k;
      // Counting sort of this chunk's pairs by expert.
      std::fill(start.begin(), start.end(), 0);
      for (int64_t p = 0; p < pair_count; ++p) ++start[chosen[p] + 1];
      for (int64_t e = 0; e < experts; ++e) start[e + 1] += start[e];
      for (int64_t p = 0; p < pair_count; ++p) pairs[start[chosen[p]]++] = p;
      for (int64_t s = 0; s < pair_count; ++s) {
        const int64_t p = pairs[s], t = t0 + p / k;
        all_dots(a + chosen[p] * rank * din, din, rank, x + t * din, &codes[p * rank]);
      }
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
      for (int64_t s = 0; s < pair_count; ++s) {
        const int64_t p = pairs[s], t = t0 + p / k;
        all_expands(b + chosen[p] * rank * dout, dout, rank, &codes[p * rank], out + t * dout);
      }
    }
  }
  return 0;
}

}  // extern "C"
