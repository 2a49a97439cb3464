// CPU kernels for DynaMixer's token mixing: every segment of every row (or column) of an NHWC map mixed by its
// own N x N matrix, read and written in the map's own layout (no segment-major copies), in fp32 or bf16 with
// fp32 accumulation. Built at first use by dynamixer/models/cpu_mix.py, which also gives the ops their
// shapes for the compiler and their autograd formula; tested against torch's ops in tests/test_cpu_mix.py.
//
// Shapes: x, out, grad (B, H, W, C) with unit channel stride (any other strides: views are fine);
// mix (B, L1, S, N, N) with the last three dimensions contiguous (the first two may be broadcast, stride 0).
// Rows: L1 = H, N = W, line (b, h) holds the tokens x[b, h, :]; columns: L1 = W, N = H, line (b, w) holds
// x[b, :, w]. Channels split into S segments of c = C / S; out[line j, segment s] = sum_i mix[s, j, i] x[line i, s].
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

struct Lines {  // element strides of a map seen as lines of tokens
  int64_t batch, line, token;
};

Lines lines_of(const at::Tensor& t, bool columns) {
  return {t.stride(0), columns ? t.stride(2) : t.stride(1), columns ? t.stride(1) : t.stride(2)};
}

void check_map(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 4 && t.sizes() == x.sizes(), name,
              " must be a CPU map of x's shape (B, H, W, C), got ", t.sizes());
  TORCH_CHECK(t.stride(3) == 1, name, " must have unit stride over channels");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must have x's dtype");
}

void check_mix(const at::Tensor& mix, const at::Tensor& x, bool columns) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.stride(3) == 1,
              "x must be a CPU map (B, H, W, C) with unit stride over channels");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(mix.scalar_type() == x.scalar_type(), "mix must have x's dtype");
  const int64_t L1 = columns ? x.size(2) : x.size(1), N = columns ? x.size(1) : x.size(2);
  TORCH_CHECK(mix.dim() == 5 && mix.size(0) == x.size(0) && mix.size(1) == L1 && mix.size(3) == N &&
                  mix.size(4) == N && x.size(3) % mix.size(2) == 0,
              "mix must be (B, L1, S, N, N) for x ", x.sizes(), ", got ", mix.sizes());
  TORCH_CHECK(mix.stride(4) == 1 && mix.stride(3) == N && mix.stride(2) == N * N,
              "mix's last three dimensions must be contiguous");
}

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) {  // bf16 is the top half of an fp32: a shift the compiler vectorises
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline void from_float(float v, float* out) { *out = v; }
inline void from_float(float v, at::BFloat16* out) {  // round to nearest even (the values here are finite)
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  out->x = static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

template <typename T>
inline void load_line(const T* src, int64_t token_stride, int64_t N, int64_t C, float* dst) {
  for (int64_t n = 0; n < N; ++n) {
    const T* row = src + n * token_stride;
    float* out = dst + n * C;
    for (int64_t ch = 0; ch < C; ++ch) out[ch] = to_float(row[ch]);
  }
}

template <typename T>
inline void store_line(const float* src, int64_t N, int64_t C, bool accumulate, T* dst, int64_t token_stride) {
  for (int64_t n = 0; n < N; ++n) {
    const float* in = src + n * C;
    T* row = dst + n * token_stride;
    if (accumulate) {
      for (int64_t ch = 0; ch < C; ++ch) from_float(to_float(row[ch]) + in[ch], row + ch);
    } else {
      for (int64_t ch = 0; ch < C; ++ch) from_float(in[ch], row + ch);
    }
  }
}

// Eight fp32 lanes in the compiler's portable vector extension (x86 AVX2/AVX-512 registers, ARM NEON pairs):
// a segment's channels held in registers as whole vectors when its width is a multiple of 8.
typedef float Vec8 __attribute__((vector_size(32)));

inline Vec8 load8(const float* p) {
  Vec8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store8(float* p, Vec8 v) { std::memcpy(p, &v, sizeof(v)); }

// out[j, s, :] = sum_i P[s, j, i] x[i, s, :] for one line (or with P transposed: P[s, i, j]), all in fp32.
// V > 0: segments of 8 V channels, kept in registers; V = 0: any width.
template <int V>
void mix_one_line(const float* pf, const float* xf, int64_t S, int64_t N, int64_t C, bool transpose, float* out) {
  const int64_t c = C / S;
  for (int64_t s = 0; s < S; ++s) {
    const float* p = pf + s * N * N;
    for (int64_t j = 0; j < N; ++j) {
      float* o = out + j * C + s * c;
      if constexpr (V > 0) {
        Vec8 acc[V] = {};
        for (int64_t i = 0; i < N; ++i) {
          const float w = transpose ? p[i * N + j] : p[j * N + i];
          const float* xi = xf + i * C + s * c;
          for (int v = 0; v < V; ++v) acc[v] += w * load8(xi + 8 * v);
        }
        for (int v = 0; v < V; ++v) store8(o + 8 * v, acc[v]);
      } else {
        for (int64_t ch = 0; ch < c; ++ch) o[ch] = 0.f;
        for (int64_t i = 0; i < N; ++i) {
          const float w = transpose ? p[i * N + j] : p[j * N + i];
          const float* xi = xf + i * C + s * c;
          for (int64_t ch = 0; ch < c; ++ch) o[ch] += w * xi[ch];
        }
      }
    }
  }
}

// grad_mix[s, j, i] = <grad[j, s, :], x[i, s, :]> for one line.
template <int V>
void mix_grad_one_line(const float* gf, const float* xf, int64_t S, int64_t N, int64_t C, float* grad_mix) {
  const int64_t c = C / S;
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t j = 0; j < N; ++j) {
      const float* gj = gf + j * C + s * c;
      for (int64_t i = 0; i < N; ++i) {
        const float* xi = xf + i * C + s * c;
        float dot = 0.f;
        if constexpr (V > 0) {
          Vec8 acc = load8(gj) * load8(xi);
          for (int v = 1; v < V; ++v) acc += load8(gj + 8 * v) * load8(xi + 8 * v);
          for (int lane = 0; lane < 8; ++lane) dot += acc[lane];
        } else {
          for (int64_t ch = 0; ch < c; ++ch) dot += gj[ch] * xi[ch];
        }
        grad_mix[(s * N + j) * N + i] = dot;
      }
    }
  }
}

// The line kernels for a segment width: whole vectors for the common ones, the general loop otherwise.
struct LineKernels {
  void (*mix)(const float*, const float*, int64_t, int64_t, int64_t, bool, float*);
  void (*grad_mix)(const float*, const float*, int64_t, int64_t, int64_t, float*);
};

LineKernels line_kernels(int64_t c) {
  switch (c) {
    case 8: return {&mix_one_line<1>, &mix_grad_one_line<1>};
    case 16: return {&mix_one_line<2>, &mix_grad_one_line<2>};
    case 24: return {&mix_one_line<3>, &mix_grad_one_line<3>};
    case 32: return {&mix_one_line<4>, &mix_grad_one_line<4>};
    case 48: return {&mix_one_line<6>, &mix_grad_one_line<6>};
    case 64: return {&mix_one_line<8>, &mix_grad_one_line<8>};
    default: return {&mix_one_line<0>, &mix_grad_one_line<0>};
  }
}

// exp(x) for x <= 0 (logits less their row's maximum; -z^2 / 2 in GELU): 2^k 2^f with k an integer and
// |f| <= 1/2, 2^f by its Taylor polynomial of degree 7 (relative error under 2e-7, as std::exp's rounding).
// Branch-free, so loops over it vectorise (libm's expf is scalar without -ffast-math, which would also drop
// -inf); below -87 (masked padding: -inf) it gives exactly 0.
inline float exp_nonpositive(float x) {
  const float t = std::max(x, -87.f) * 1.44269504088896341f;  // x log2(e), kept where 2^k is a normal float
  const float k = std::floor(t + 0.5f);
  const float f = (t - k) * 0.693147180559945309f;  // e^f = 2^(t - k)
  float e = 1.f / 5040.f;
  e = e * f + 1.f / 720.f;
  e = e * f + 1.f / 120.f;
  e = e * f + 1.f / 24.f;
  e = e * f + 1.f / 6.f;
  e = e * f + 0.5f;
  e = e * f + 1.f;
  e = e * f + 1.f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.f ? 0.f : e * scale;
}

inline void exp_nonpositive(float* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = exp_nonpositive(p[i]);
}

// With `softmax`, mix holds logits: each row of N is normalised (softmax) as it is loaded. NC: N when known at
// compile time (the common line lengths; the row loops then vectorise), else 0.
template <int NC>
void softmax_rows_of(float* p, int64_t rows, int64_t n) {
  const int64_t N = NC ? NC : n;
  float* row = p;
  for (int64_t r = 0; r < rows; ++r, row += N) {
    float top = row[0];
    for (int64_t i = 1; i < N; ++i) top = std::max(top, row[i]);
    for (int64_t i = 0; i < N; ++i) row[i] -= top;
  }
  exp_nonpositive(p, rows * N);
  row = p;
  for (int64_t r = 0; r < rows; ++r, row += N) {
    float sum = 0.f;
    for (int64_t i = 0; i < N; ++i) sum += row[i];
    const float scale = 1.f / sum;
    for (int64_t i = 0; i < N; ++i) row[i] *= scale;
  }
}

inline void softmax_rows(float* p, int64_t rows, int64_t N) {
  switch (N) {
    case 4: return softmax_rows_of<4>(p, rows, N);
    case 8: return softmax_rows_of<8>(p, rows, N);
    case 16: return softmax_rows_of<16>(p, rows, N);
    default: return softmax_rows_of<0>(p, rows, N);
  }
}

// grad_logits = P (grad_P - <grad_P, P>) per row, in place of grad_P.
template <int NC>
void softmax_rows_backward_of(const float* p, float* grad, int64_t rows, int64_t n) {
  const int64_t N = NC ? NC : n;
  for (int64_t r = 0; r < rows; ++r, p += N, grad += N) {
    float dot = 0.f;
    for (int64_t i = 0; i < N; ++i) dot += grad[i] * p[i];
    for (int64_t i = 0; i < N; ++i) grad[i] = p[i] * (grad[i] - dot);
  }
}

inline void softmax_rows_backward(const float* p, float* grad, int64_t rows, int64_t N) {
  switch (N) {
    case 4: return softmax_rows_backward_of<4>(p, grad, rows, N);
    case 8: return softmax_rows_backward_of<8>(p, grad, rows, N);
    case 16: return softmax_rows_backward_of<16>(p, grad, rows, N);
    default: return softmax_rows_backward_of<0>(p, grad, rows, N);
  }
}

template <typename T>
void mix_lines_kernel(const at::Tensor& mix, const at::Tensor& x, bool columns, bool accumulate, bool softmax,
                      const at::Tensor& out) {
  const int64_t B = x.size(0), C = x.size(3), S = mix.size(2), N = mix.size(3), L1 = mix.size(1);
  const Lines xl = lines_of(x, columns), ol = lines_of(out, columns);
  const int64_t mb = mix.stride(0), ml = mix.stride(1);
  const T* X = x.const_data_ptr<T>();
  const T* P = mix.const_data_ptr<T>();
  T* O = out.mutable_data_ptr<T>();
  const LineKernels kernels = line_kernels(C / S);
  at::parallel_for(0, B * L1, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(N * C), pf(S * N * N), of(N * C);
    for (int64_t bl = begin; bl < end; ++bl) {
      const int64_t b = bl / L1, l = bl % L1;
      load_line(X + b * xl.batch + l * xl.line, xl.token, N, C, xf.data());
      load_line(P + b * mb + l * ml, 0, 1, S * N * N, pf.data());
      if (softmax) softmax_rows(pf.data(), S * N, N);
      kernels.mix(pf.data(), xf.data(), S, N, C, /*transpose=*/false, of.data());
      store_line(of.data(), N, C, accumulate, O + b * ol.batch + l * ol.line, ol.token);
    }
  });
}

// grad_mix[s, j, i] = <grad[j, s, :], x[i, s, :]>; grad_x[i, s, :] (+)= sum_j P[s, j, i] grad[j, s, :]; with
// `softmax` (mix holds logits) grad_mix is the logits' gradient.
template <typename T>
void mix_lines_backward_kernel(const at::Tensor& grad, const at::Tensor& mix, const at::Tensor& x, bool columns,
                               const c10::optional<at::Tensor>& grad_mix, const c10::optional<at::Tensor>& grad_x,
                               bool accumulate, bool softmax) {
  const int64_t B = x.size(0), C = x.size(3), S = mix.size(2), N = mix.size(3), L1 = mix.size(1);
  const Lines xl = lines_of(x, columns), gl = lines_of(grad, columns);
  const int64_t mb = mix.stride(0), ml = mix.stride(1);
  const T* X = x.const_data_ptr<T>();
  const T* G = grad.const_data_ptr<T>();
  const T* P = mix.const_data_ptr<T>();
  T* GM = grad_mix ? grad_mix->mutable_data_ptr<T>() : nullptr;
  T* GX = grad_x ? grad_x->mutable_data_ptr<T>() : nullptr;
  const Lines gxl = grad_x ? lines_of(*grad_x, columns) : Lines{0, 0, 0};
  const LineKernels kernels = line_kernels(C / S);
  at::parallel_for(0, B * L1, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> gf(N * C), xf(N * C), pf(S * N * N), gmf(S * N * N), of(N * C);
    for (int64_t bl = begin; bl < end; ++bl) {
      const int64_t b = bl / L1, l = bl % L1;
      load_line(G + b * gl.batch + l * gl.line, gl.token, N, C, gf.data());
      if (GX || softmax) {
        load_line(P + b * mb + l * ml, 0, 1, S * N * N, pf.data());
        if (softmax) softmax_rows(pf.data(), S * N, N);
      }
      if (GM) {
        load_line(X + b * xl.batch + l * xl.line, xl.token, N, C, xf.data());
        kernels.grad_mix(gf.data(), xf.data(), S, N, C, gmf.data());
        if (softmax) softmax_rows_backward(pf.data(), gmf.data(), S * N, N);
        store_line(gmf.data(), 1, S * N * N, false, GM + bl * S * N * N, 0);
      }
      if (GX) {
        kernels.mix(pf.data(), gf.data(), S, N, C, /*transpose=*/true, of.data());
        store_line(of.data(), N, C, accumulate, GX + b * gxl.batch + l * gxl.line, gxl.token);
      }
    }
  });
}

void mix_lines_out(const at::Tensor& mix, const at::Tensor& x, bool columns, bool accumulate, at::Tensor out,
                   bool softmax) {
  check_mix(mix, x, columns);
  check_map(out, x, "out");
  if (x.scalar_type() == at::kFloat) {
    mix_lines_kernel<float>(mix, x, columns, accumulate, softmax, out);
  } else {
    mix_lines_kernel<at::BFloat16>(mix, x, columns, accumulate, softmax, out);
  }
}

at::Tensor mix_lines(const at::Tensor& mix, const at::Tensor& x, bool columns) {
  at::Tensor out = at::empty(x.sizes(), x.options());
  mix_lines_out(mix, x, columns, false, out, false);
  return out;
}

void mix_lines_backward_out(const at::Tensor& grad, const at::Tensor& mix, const at::Tensor& x, bool columns,
                            const c10::optional<at::Tensor>& grad_mix, const c10::optional<at::Tensor>& grad_x,
                            bool accumulate, bool softmax) {
  check_mix(mix, x, columns);
  check_map(grad, x, "grad");
  if (grad_mix) {
    TORCH_CHECK(grad_mix->is_contiguous() && grad_mix->scalar_type() == x.scalar_type() &&
                    grad_mix->sizes() == mix.sizes(),
                "grad_mix must be a contiguous tensor of mix's shape and x's dtype");
  }
  if (grad_x) check_map(*grad_x, x, "grad_x");
  if (x.scalar_type() == at::kFloat) {
    mix_lines_backward_kernel<float>(grad, mix, x, columns, grad_mix, grad_x, accumulate, softmax);
  } else {
    mix_lines_backward_kernel<at::BFloat16>(grad, mix, x, columns, grad_mix, grad_x, accumulate, softmax);
  }
}

std::tuple<at::Tensor, at::Tensor> mix_lines_backward(const at::Tensor& grad, const at::Tensor& mix,
                                                      const at::Tensor& x, bool columns) {
  at::Tensor grad_mix = at::empty(mix.sizes(), x.options());  // full even where mix is broadcast
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  mix_lines_backward_out(grad, mix, x, columns, grad_mix, grad_x, false, false);
  return {grad_mix, grad_x};
}

// The re-weighting fusion of the three branches (DynaMixer's official fusion): per image b and channel k,
// out = w_row (rows + b_row) + w_col (cols + b_col) + w_chan chans, with weights (B, C, 3) in the official
// branch order (column, row, channel), fp32, and optional fp32 biases (C) of the row and column projections.
// Maps (B, H, W, C) of one dtype, any strides with unit channel stride; fp32 arithmetic.
struct Branches {
  const at::Tensor& rows;
  const at::Tensor& cols;
  const at::Tensor& chans;
};

void check_reweight(const Branches& maps, const at::Tensor& weights, const c10::optional<at::Tensor>& bias_row,
                    const c10::optional<at::Tensor>& bias_col) {
  const at::Tensor& rows = maps.rows;
  TORCH_CHECK(rows.device().is_cpu() && rows.dim() == 4 && rows.stride(3) == 1 &&
                  (rows.scalar_type() == at::kFloat || rows.scalar_type() == at::kBFloat16),
              "rows must be a float32 or bfloat16 CPU map (B, H, W, C) with unit stride over channels");
  check_map(maps.cols, rows, "cols");
  check_map(maps.chans, rows, "chans");
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.is_contiguous() && weights.dim() == 3 &&
                  weights.size(0) == rows.size(0) && weights.size(1) == rows.size(3) && weights.size(2) == 3,
              "weights must be a contiguous float32 (B, C, 3), got ", weights.sizes());
  for (const auto* bias : {&bias_row, &bias_col}) {
    TORCH_CHECK(!bias->has_value() || ((*bias)->scalar_type() == at::kFloat && (*bias)->is_contiguous() &&
                                       (*bias)->dim() == 1 && (*bias)->size(0) == rows.size(3)),
                "the branch biases must be contiguous float32 (C)");
  }
}

struct ImageWeights {  // one image's weights split by branch, the biases folded in as constants
  std::vector<float> row, col, chan;
};

ImageWeights image_weights(const float* w, int64_t C) {
  ImageWeights out{std::vector<float>(C), std::vector<float>(C), std::vector<float>(C)};
  for (int64_t k = 0; k < C; ++k) {
    out.col[k] = w[3 * k];
    out.row[k] = w[3 * k + 1];
    out.chan[k] = w[3 * k + 2];
  }
  return out;
}

template <typename T>
void reweight_kernel(const Branches& maps, const at::Tensor& weights, const float* bias_row, const float* bias_col,
                     const at::Tensor& out) {
  const int64_t B = out.size(0), H = out.size(1), W = out.size(2), C = out.size(3);
  const T* R = maps.rows.const_data_ptr<T>();
  const T* L = maps.cols.const_data_ptr<T>();
  const T* X = maps.chans.const_data_ptr<T>();
  T* O = out.mutable_data_ptr<T>();
  const float* WT = weights.const_data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> constant(C), r(C), l(C), x(C), o(C);
    for (int64_t b = begin; b < end; ++b) {
      const ImageWeights w = image_weights(WT + b * C * 3, C);
      for (int64_t k = 0; k < C; ++k) {
        constant[k] = (bias_row ? w.row[k] * bias_row[k] : 0.f) + (bias_col ? w.col[k] * bias_col[k] : 0.f);
      }
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t v = 0; v < W; ++v) {
          auto offset = [&](const at::Tensor& t) { return b * t.stride(0) + h * t.stride(1) + v * t.stride(2); };
          load_line(R + offset(maps.rows), 0, 1, C, r.data());
          load_line(L + offset(maps.cols), 0, 1, C, l.data());
          load_line(X + offset(maps.chans), 0, 1, C, x.data());
          for (int64_t k = 0; k < C; ++k) o[k] = constant[k] + w.row[k] * r[k] + w.col[k] * l[k] + w.chan[k] * x[k];
          store_line(o.data(), 1, C, false, O + offset(out), 0);
        }
      }
    }
  });
}

// grad_rows = w_row g, grad_cols = w_col g, grad_chans = w_chan g; grad_weights[b, k] = sum over the image of g
// times (cols + b_col, rows + b_row, chans); grad_sum[b, k] = sum over the image of g (for the biases).
template <typename T>
void reweight_backward_kernel(const at::Tensor& grad, const Branches& maps, const at::Tensor& weights,
                              const float* bias_row, const float* bias_col, const Branches& grads,
                              const at::Tensor& grad_weights, const at::Tensor& grad_sum) {
  const int64_t B = grad.size(0), H = grad.size(1), W = grad.size(2), C = grad.size(3);
  const T* G = grad.const_data_ptr<T>();
  const T* R = maps.rows.const_data_ptr<T>();
  const T* L = maps.cols.const_data_ptr<T>();
  const T* X = maps.chans.const_data_ptr<T>();
  T* GR = const_cast<T*>(grads.rows.const_data_ptr<T>());
  T* GL = const_cast<T*>(grads.cols.const_data_ptr<T>());
  T* GX = const_cast<T*>(grads.chans.const_data_ptr<T>());
  const float* WT = weights.const_data_ptr<float>();
  float* GW = grad_weights.mutable_data_ptr<float>();
  float* GS = grad_sum.mutable_data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> g(C), r(C), l(C), x(C), out(C), sum_r(C), sum_l(C), sum_x(C), sum_g(C);
    for (int64_t b = begin; b < end; ++b) {
      const ImageWeights w = image_weights(WT + b * C * 3, C);
      std::fill(sum_r.begin(), sum_r.end(), 0.f);
      std::fill(sum_l.begin(), sum_l.end(), 0.f);
      std::fill(sum_x.begin(), sum_x.end(), 0.f);
      std::fill(sum_g.begin(), sum_g.end(), 0.f);
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t v = 0; v < W; ++v) {
          auto offset = [&](const at::Tensor& t) { return b * t.stride(0) + h * t.stride(1) + v * t.stride(2); };
          load_line(G + offset(grad), 0, 1, C, g.data());
          load_line(R + offset(maps.rows), 0, 1, C, r.data());
          load_line(L + offset(maps.cols), 0, 1, C, l.data());
          load_line(X + offset(maps.chans), 0, 1, C, x.data());
          for (int64_t k = 0; k < C; ++k) {
            sum_r[k] += g[k] * r[k];
            sum_l[k] += g[k] * l[k];
            sum_x[k] += g[k] * x[k];
            sum_g[k] += g[k];
          }
          for (int64_t k = 0; k < C; ++k) out[k] = w.row[k] * g[k];
          store_line(out.data(), 1, C, false, GR + offset(grads.rows), 0);
          for (int64_t k = 0; k < C; ++k) out[k] = w.col[k] * g[k];
          store_line(out.data(), 1, C, false, GL + offset(grads.cols), 0);
          for (int64_t k = 0; k < C; ++k) out[k] = w.chan[k] * g[k];
          store_line(out.data(), 1, C, false, GX + offset(grads.chans), 0);
        }
      }
      for (int64_t k = 0; k < C; ++k) {
        GW[(b * C + k) * 3] = sum_l[k] + (bias_col ? bias_col[k] * sum_g[k] : 0.f);
        GW[(b * C + k) * 3 + 1] = sum_r[k] + (bias_row ? bias_row[k] * sum_g[k] : 0.f);
        GW[(b * C + k) * 3 + 2] = sum_x[k];
        GS[b * C + k] = sum_g[k];
      }
    }
  });
}

const float* data_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<float>() : nullptr;
}

at::Tensor reweight(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& chans, const at::Tensor& weights,
                    const c10::optional<at::Tensor>& bias_row, const c10::optional<at::Tensor>& bias_col) {
  const Branches maps{rows, cols, chans};
  check_reweight(maps, weights, bias_row, bias_col);
  at::Tensor out = at::empty(rows.sizes(), rows.options());
  if (rows.scalar_type() == at::kFloat) {
    reweight_kernel<float>(maps, weights, data_or_null(bias_row), data_or_null(bias_col), out);
  } else {
    reweight_kernel<at::BFloat16>(maps, weights, data_or_null(bias_row), data_or_null(bias_col), out);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> reweight_backward(
    const at::Tensor& grad, const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& chans,
    const at::Tensor& weights, const c10::optional<at::Tensor>& bias_row, const c10::optional<at::Tensor>& bias_col) {
  const Branches maps{rows, cols, chans};
  check_reweight(maps, weights, bias_row, bias_col);
  check_map(grad, rows, "grad");
  // each gradient in its map's layout where that is dense (e.g. the columns' transposed view), else contiguous
  at::Tensor grad_rows = at::empty_like(rows), grad_cols = at::empty_like(cols), grad_chans = at::empty_like(chans);
  at::Tensor grad_weights = at::empty(weights.sizes(), weights.options());
  at::Tensor grad_sum = at::empty({rows.size(0), rows.size(3)}, weights.options());
  const Branches grads{grad_rows, grad_cols, grad_chans};
  if (rows.scalar_type() == at::kFloat) {
    reweight_backward_kernel<float>(grad, maps, weights, data_or_null(bias_row), data_or_null(bias_col), grads,
                                    grad_weights, grad_sum);
  } else {
    reweight_backward_kernel<at::BFloat16>(grad, maps, weights, data_or_null(bias_row), data_or_null(bias_col),
                                           grads, grad_weights, grad_sum);
  }
  return {grad_rows, grad_cols, grad_chans, grad_weights, grad_sum};
}

// The conv stem's BatchNorm in training (the batch's statistics) followed by the exact GELU, on a channels-last
// map seen as M rows of C channels (contiguous), fp32 or bf16 with fp32 arithmetic: out = gelu(z),
// z = (y - mean) invstd w + b. ATen runs it as a norm, then a GELU, each with passes of its own, and inductor's
// decomposition reduces over 24 or 48 channels in one or two vector chunks; here the forward reads y twice
// (statistics, then output) and the backward twice, recomputing z and GELU's derivative from y instead of storing
// them. Sums are taken per block of rows and added in block order: results do not depend on the thread count.
constexpr int64_t kNormRows = 64;

// erf by Abramowitz and Stegun 7.1.26 (absolute error under 1.5e-7; ATen's vectorised erf uses the same formula)
inline float erf_approx(float x) {
  const float a = std::fabs(x);
  const float t = 1.f / (1.f + 0.3275911f * a);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  return std::copysign(1.f - p * t * exp_nonpositive(-a * a), x);
}

inline float gelu(float z) { return 0.5f * z * (1.f + erf_approx(z * 0.70710678118654752f)); }

inline float gelu_derivative(float z) {
  return 0.5f * (1.f + erf_approx(z * 0.70710678118654752f)) + 0.39894228040143268f * z * exp_nonpositive(-0.5f * z * z);
}

struct NormBlocks {  // the rows [begin, end) of block i, and per-block sums of two per-channel quantities
  int64_t M, C, count;
  std::vector<double> sums;
  NormBlocks(int64_t M, int64_t C) : M(M), C(C), count((M + kNormRows - 1) / kNormRows), sums(count * 2 * C) {}
  int64_t begin(int64_t i) const { return i * kNormRows; }
  int64_t end(int64_t i) const { return std::min(M, (i + 1) * kNormRows); }
  void keep(int64_t i, const float* first, const float* second) {
    double* out = sums.data() + i * 2 * C;
    for (int64_t c = 0; c < C; ++c) out[c] = first[c], out[C + c] = second[c];
  }
  std::pair<std::vector<double>, std::vector<double>> total() const {
    std::vector<double> first(C, 0.), second(C, 0.);
    for (int64_t i = 0; i < count; ++i) {
      const double* in = sums.data() + i * 2 * C;
      for (int64_t c = 0; c < C; ++c) first[c] += in[c], second[c] += in[C + c];
    }
    return {first, second};
  }
};

template <typename T>
void load_block(const T* __restrict__ src, int64_t n, float* __restrict__ dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

template <typename T>
void store_block(const float* __restrict__ src, int64_t n, T* __restrict__ dst) {
  for (int64_t i = 0; i < n; ++i) from_float(src[i], dst + i);
}

// xhat = (y - mean) invstd and z = xhat w + b for the rows of one block
void normalise_block(const float* __restrict__ y, int64_t rows, int64_t C, const float* __restrict__ mean,
                     const float* __restrict__ invstd, const float* __restrict__ w, const float* __restrict__ b,
                     float* __restrict__ xhat, float* __restrict__ z) {
  for (int64_t r = 0; r < rows; ++r, y += C, xhat += C, z += C) {
    for (int64_t c = 0; c < C; ++c) {
      const float v = (y[c] - mean[c]) * invstd[c];
      xhat[c] = v;
      z[c] = v * w[c] + b[c];
    }
  }
}

// per channel: first += a - shift, second += (a - shift) (b - shift) over the rows (shift null: 0; b is a for
// the statistics, xhat for the gradient's)
void sum_block(const float* __restrict__ a, const float* __restrict__ b, int64_t rows, int64_t C,
               const float* __restrict__ shift, float* __restrict__ first, float* __restrict__ second) {
  for (int64_t r = 0; r < rows; ++r, a += C, b += C) {
    if (shift) {
      for (int64_t c = 0; c < C; ++c) {
        const float d = a[c] - shift[c];
        first[c] += d;
        second[c] += d * d;
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        first[c] += a[c];
        second[c] += a[c] * b[c];
      }
    }
  }
}

// grad_y = w invstd (g - mean(g) - xhat mean(g xhat)), xhat = (y - mean) invstd, in place of g
void finish_gradient(float* __restrict__ g, const float* __restrict__ y, int64_t rows, int64_t C,
                     const float* __restrict__ mean, const float* __restrict__ invstd,
                     const float* __restrict__ scale, const float* __restrict__ mean_g,
                     const float* __restrict__ mean_gx) {
  for (int64_t r = 0; r < rows; ++r, g += C, y += C) {
    for (int64_t c = 0; c < C; ++c) {
      g[c] = scale[c] * (g[c] - mean_g[c] - (y[c] - mean[c]) * invstd[c] * mean_gx[c]);
    }
  }
}

template <typename T>
void batch_norm_gelu_kernel(const T* Y, int64_t M, int64_t C, const float* w, const float* b, double eps, T* O,
                            float* mean, float* invstd) {
  NormBlocks blocks(M, C);
  std::vector<float> shift(C);  // the first row: sums of (y - shift) lose little to cancellation
  load_block(Y, C, shift.data());
  at::parallel_for(0, blocks.count, 1, [&](int64_t first, int64_t last) {
    std::vector<float> y(kNormRows * C), s(C), q(C);
    for (int64_t i = first; i < last; ++i) {
      const int64_t rows = blocks.end(i) - blocks.begin(i);
      load_block(Y + blocks.begin(i) * C, rows * C, y.data());
      std::fill(s.begin(), s.end(), 0.f);
      std::fill(q.begin(), q.end(), 0.f);
      sum_block(y.data(), y.data(), rows, C, shift.data(), s.data(), q.data());
      blocks.keep(i, s.data(), q.data());
    }
  });
  const auto [sum, sum_sq] = blocks.total();
  for (int64_t c = 0; c < C; ++c) {
    const double m = sum[c] / M;
    mean[c] = static_cast<float>(shift[c] + m);
    invstd[c] = static_cast<float>(1. / std::sqrt(std::max(sum_sq[c] / M - m * m, 0.) + eps));
  }
  at::parallel_for(0, blocks.count, 1, [&](int64_t first, int64_t last) {
    std::vector<float> y(kNormRows * C), xhat(kNormRows * C), z(kNormRows * C);
    for (int64_t i = first; i < last; ++i) {
      const int64_t n = (blocks.end(i) - blocks.begin(i)) * C;
      load_block(Y + blocks.begin(i) * C, n, y.data());
      normalise_block(y.data(), n / C, C, mean, invstd, w, b, xhat.data(), z.data());
      for (int64_t j = 0; j < n; ++j) z[j] = gelu(z[j]);
      store_block(z.data(), n, O + blocks.begin(i) * C);
    }
  });
}

template <typename T>
void batch_norm_gelu_backward_kernel(const T* G, const T* Y, int64_t M, int64_t C, const float* mean,
                                     const float* invstd, const float* w, const float* b, T* GY, float* grad_w,
                                     float* grad_b) {
  NormBlocks blocks(M, C);
  // g is kept between the passes in grad_y's buffer (recomputing GELU's derivative costs more than storing it;
  // in bf16 rounded as ATen's GELU backward rounds its output before the norm's backward)
  at::parallel_for(0, blocks.count, 1, [&](int64_t first, int64_t last) {
    std::vector<float> y(kNormRows * C), xh(kNormRows * C), g(kNormRows * C), sg(C), sgx(C);
    for (int64_t i = first; i < last; ++i) {
      const int64_t n = (blocks.end(i) - blocks.begin(i)) * C, offset = blocks.begin(i) * C;
      float* gi = g.data();
      load_block(Y + offset, n, y.data());
      normalise_block(y.data(), n / C, C, mean, invstd, w, b, xh.data(), gi);
      for (int64_t j = 0; j < n; ++j) gi[j] = gelu_derivative(gi[j]);
      load_block(G + offset, n, y.data());
      for (int64_t j = 0; j < n; ++j) gi[j] *= y[j];
      std::fill(sg.begin(), sg.end(), 0.f);
      std::fill(sgx.begin(), sgx.end(), 0.f);
      sum_block(gi, xh.data(), n / C, C, nullptr, sg.data(), sgx.data());
      blocks.keep(i, sg.data(), sgx.data());
      store_block(gi, n, GY + offset);
    }
  });
  const auto [sum_g, sum_gx] = blocks.total();
  std::vector<float> scale(C), mean_g(C), mean_gx(C);
  for (int64_t c = 0; c < C; ++c) {
    grad_b[c] = static_cast<float>(sum_g[c]);
    grad_w[c] = static_cast<float>(sum_gx[c]);
    scale[c] = w[c] * invstd[c];
    mean_g[c] = static_cast<float>(sum_g[c] / M);
    mean_gx[c] = static_cast<float>(sum_gx[c] / M);
  }
  at::parallel_for(0, blocks.count, 1, [&](int64_t first, int64_t last) {
    std::vector<float> y(kNormRows * C), g(kNormRows * C);
    for (int64_t i = first; i < last; ++i) {
      const int64_t rows = blocks.end(i) - blocks.begin(i), offset = blocks.begin(i) * C;
      load_block(Y + offset, rows * C, y.data());
      load_block(GY + offset, rows * C, g.data());
      finish_gradient(g.data(), y.data(), rows, C, mean, invstd, scale.data(), mean_g.data(), mean_gx.data());
      store_block(g.data(), rows * C, GY + offset);
    }
  });
}

void check_norm(const at::Tensor& y, const at::Tensor& w, const at::Tensor& b) {
  TORCH_CHECK(y.device().is_cpu() && y.dim() >= 2 && y.is_contiguous() && y.numel() > 0 &&
                  (y.scalar_type() == at::kFloat || y.scalar_type() == at::kBFloat16),
              "y must be a non-empty contiguous float32 or bfloat16 CPU map with channels last, got ", y.sizes());
  const int64_t C = y.size(-1);
  for (const auto* t : {&w, &b}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 1 && t->size(0) == C,
                "the norm's weight and bias must be contiguous float32 (C) for C = ", C);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_gelu(const at::Tensor& y, const at::Tensor& weight,
                                                               const at::Tensor& bias, double eps) {
  check_norm(y, weight, bias);
  const int64_t C = y.size(-1), M = y.numel() / C;
  at::Tensor out = at::empty_like(y);
  at::Tensor mean = at::empty({C}, weight.options()), invstd = at::empty({C}, weight.options());
  const float *w = weight.const_data_ptr<float>(), *b = bias.const_data_ptr<float>();
  if (y.scalar_type() == at::kFloat) {
    batch_norm_gelu_kernel<float>(y.const_data_ptr<float>(), M, C, w, b, eps, out.mutable_data_ptr<float>(),
                                  mean.mutable_data_ptr<float>(), invstd.mutable_data_ptr<float>());
  } else {
    batch_norm_gelu_kernel<at::BFloat16>(y.const_data_ptr<at::BFloat16>(), M, C, w, b, eps,
                                         out.mutable_data_ptr<at::BFloat16>(), mean.mutable_data_ptr<float>(),
                                         invstd.mutable_data_ptr<float>());
  }
  return {out, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_gelu_backward(
    const at::Tensor& grad, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& weight, const at::Tensor& bias) {
  check_norm(y, weight, bias);
  check_norm(y, mean, invstd);
  TORCH_CHECK(grad.sizes() == y.sizes() && grad.is_contiguous() && grad.scalar_type() == y.scalar_type(),
              "grad must be contiguous, of y's shape and dtype");
  const int64_t C = y.size(-1), M = y.numel() / C;
  at::Tensor grad_y = at::empty_like(y);
  at::Tensor grad_w = at::empty({C}, weight.options()), grad_b = at::empty({C}, weight.options());
  const float *m = mean.const_data_ptr<float>(), *s = invstd.const_data_ptr<float>();
  const float *w = weight.const_data_ptr<float>(), *b = bias.const_data_ptr<float>();
  float *gw = grad_w.mutable_data_ptr<float>(), *gb = grad_b.mutable_data_ptr<float>();
  if (y.scalar_type() == at::kFloat) {
    batch_norm_gelu_backward_kernel<float>(grad.const_data_ptr<float>(), y.const_data_ptr<float>(), M, C, m, s, w,
                                           b, grad_y.mutable_data_ptr<float>(), gw, gb);
  } else {
    batch_norm_gelu_backward_kernel<at::BFloat16>(grad.const_data_ptr<at::BFloat16>(),
                                                  y.const_data_ptr<at::BFloat16>(), M, C, m, s, w, b,
                                                  grad_y.mutable_data_ptr<at::BFloat16>(), gw, gb);
  }
  return {grad_y, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY(dynamixer_cpu, m) {
  m.def("mix_lines(Tensor mix, Tensor x, bool columns) -> Tensor");
  m.def("mix_lines_out(Tensor mix, Tensor x, bool columns, bool accumulate, Tensor(a!) out, bool softmax=False) "
        "-> ()");
  m.def("mix_lines_backward(Tensor grad, Tensor mix, Tensor x, bool columns) -> (Tensor, Tensor)");
  m.def("mix_lines_backward_out(Tensor grad, Tensor mix, Tensor x, bool columns, Tensor(a!)? grad_mix, "
        "Tensor(b!)? grad_x, bool accumulate, bool softmax=False) -> ()");
  m.def("reweight(Tensor rows, Tensor cols, Tensor chans, Tensor weights, Tensor? bias_row, Tensor? bias_col) "
        "-> Tensor");
  m.def("reweight_backward(Tensor grad, Tensor rows, Tensor cols, Tensor chans, Tensor weights, Tensor? bias_row, "
        "Tensor? bias_col) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("batch_norm_gelu(Tensor y, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("batch_norm_gelu_backward(Tensor grad, Tensor y, Tensor mean, Tensor invstd, Tensor weight, Tensor bias) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dynamixer_cpu, CPU, m) {
  m.impl("mix_lines", &mix_lines);
  m.impl("mix_lines_out", &mix_lines_out);
  m.impl("mix_lines_backward", &mix_lines_backward);
  m.impl("mix_lines_backward_out", &mix_lines_backward_out);
  m.impl("reweight", &reweight);
  m.impl("reweight_backward", &reweight_backward);
  m.impl("batch_norm_gelu", &batch_norm_gelu);
  m.impl("batch_norm_gelu_backward", &batch_norm_gelu_backward);
}
