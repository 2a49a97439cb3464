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

template <typename T>
void mix_lines_kernel(const at::Tensor& mix, const at::Tensor& x, bool columns, bool accumulate,
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
      kernels.mix(pf.data(), xf.data(), S, N, C, /*transpose=*/false, of.data());
      store_line(of.data(), N, C, accumulate, O + b * ol.batch + l * ol.line, ol.token);
    }
  });
}

// grad_mix[s, j, i] = <grad[j, s, :], x[i, s, :]>; grad_x[i, s, :] (+)= sum_j P[s, j, i] grad[j, s, :].
template <typename T>
void mix_lines_backward_kernel(const at::Tensor& grad, const at::Tensor& mix, const at::Tensor& x, bool columns,
                               const c10::optional<at::Tensor>& grad_mix, const c10::optional<at::Tensor>& grad_x,
                               bool accumulate) {
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
    std::vector<float> gf(N * C), xf(N * C), pf(S * N * N), of(N * C);
    for (int64_t bl = begin; bl < end; ++bl) {
      const int64_t b = bl / L1, l = bl % L1;
      load_line(G + b * gl.batch + l * gl.line, gl.token, N, C, gf.data());
      if (GM) {
        load_line(X + b * xl.batch + l * xl.line, xl.token, N, C, xf.data());
        kernels.grad_mix(gf.data(), xf.data(), S, N, C, pf.data());
        store_line(pf.data(), 1, S * N * N, false, GM + bl * S * N * N, 0);
      }
      if (GX) {
        load_line(P + b * mb + l * ml, 0, 1, S * N * N, pf.data());
        kernels.mix(pf.data(), gf.data(), S, N, C, /*transpose=*/true, of.data());
        store_line(of.data(), N, C, accumulate, GX + b * gxl.batch + l * gxl.line, gxl.token);
      }
    }
  });
}

void mix_lines_out(const at::Tensor& mix, const at::Tensor& x, bool columns, bool accumulate, at::Tensor out) {
  check_mix(mix, x, columns);
  check_map(out, x, "out");
  if (x.scalar_type() == at::kFloat) {
    mix_lines_kernel<float>(mix, x, columns, accumulate, out);
  } else {
    mix_lines_kernel<at::BFloat16>(mix, x, columns, accumulate, out);
  }
}

at::Tensor mix_lines(const at::Tensor& mix, const at::Tensor& x, bool columns) {
  at::Tensor out = at::empty(x.sizes(), x.options());
  mix_lines_out(mix, x, columns, false, out);
  return out;
}

void mix_lines_backward_out(const at::Tensor& grad, const at::Tensor& mix, const at::Tensor& x, bool columns,
                            const c10::optional<at::Tensor>& grad_mix, const c10::optional<at::Tensor>& grad_x,
                            bool accumulate) {
  check_mix(mix, x, columns);
  check_map(grad, x, "grad");
  if (grad_mix) {
    TORCH_CHECK(grad_mix->is_contiguous() && grad_mix->scalar_type() == x.scalar_type() &&
                    grad_mix->sizes() == mix.sizes(),
                "grad_mix must be a contiguous tensor of mix's shape and x's dtype");
  }
  if (grad_x) check_map(*grad_x, x, "grad_x");
  if (x.scalar_type() == at::kFloat) {
    mix_lines_backward_kernel<float>(grad, mix, x, columns, grad_mix, grad_x, accumulate);
  } else {
    mix_lines_backward_kernel<at::BFloat16>(grad, mix, x, columns, grad_mix, grad_x, accumulate);
  }
}

std::tuple<at::Tensor, at::Tensor> mix_lines_backward(const at::Tensor& grad, const at::Tensor& mix,
                                                      const at::Tensor& x, bool columns) {
  at::Tensor grad_mix = at::empty(mix.sizes(), x.options());  // full even where mix is broadcast
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  mix_lines_backward_out(grad, mix, x, columns, grad_mix, grad_x, false);
  return {grad_mix, grad_x};
}

}  // namespace

TORCH_LIBRARY(dynamixer_cpu, m) {
  m.def("mix_lines(Tensor mix, Tensor x, bool columns) -> Tensor");
  m.def("mix_lines_out(Tensor mix, Tensor x, bool columns, bool accumulate, Tensor(a!) out) -> ()");
  m.def("mix_lines_backward(Tensor grad, Tensor mix, Tensor x, bool columns) -> (Tensor, Tensor)");
  m.def("mix_lines_backward_out(Tensor grad, Tensor mix, Tensor x, bool columns, Tensor(a!)? grad_mix, "
        "Tensor(b!)? grad_x, bool accumulate) -> ()");
}

TORCH_LIBRARY_IMPL(dynamixer_cpu, CPU, m) {
  m.impl("mix_lines", &mix_lines);
  m.impl("mix_lines_out", &mix_lines_out);
  m.impl("mix_lines_backward", &mix_lines_backward);
  m.impl("mix_lines_backward_out", &mix_lines_backward_out);
}
