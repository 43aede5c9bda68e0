// Fused kernels of the training engine. Each has a CPU reference in engine/src/fused/ (one
// file per kernel family) and a test comparing the two (`lorasweep bench kernels` on the GPU
// machine).
//
// Conventions: one thread block per row for row-wise kernels (blockDim.x a multiple of 32, at
// most 1024); all arithmetic in f32 whatever the storage type; rows are contiguous.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

// Sum (or max) over the block; every thread gets the result. `scratch` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float *scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float block_max(float v, float *scratch) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : -INFINITY;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Columns a query row may attend to: row r is query position (r mod t_q) + offset, which sees
// keys 0..=position.
__device__ __forceinline__ int causal_limit(int row, int cols, int t_q, int offset) {
    return min(cols, row % t_q + offset + 1);
}

// p = softmax(scale * s) over each row, keys after the query's position masked out (p = 0).
template <typename T>
__device__ void causal_softmax_fwd(const T *s, T *p, int cols, int t_q, int offset, float scale) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const T *x = s + row * cols;
    T *y = p + row * cols;
    const int limit = causal_limit((int)row, cols, t_q, offset);
    float m = -INFINITY;
    for (int j = threadIdx.x; j < limit; j += blockDim.x) m = fmaxf(m, to_f(x[j]) * scale);
    m = block_max(m, scratch);
    float sum = 0.f;
    for (int j = threadIdx.x; j < limit; j += blockDim.x) sum += expf(to_f(x[j]) * scale - m);
    const float inv = 1.f / block_sum(sum, scratch);
    for (int j = threadIdx.x; j < cols; j += blockDim.x)
        y[j] = from_f<T>(j < limit ? expf(to_f(x[j]) * scale - m) * inv : 0.f);
}

// ds = scale * p * (dp - sum(p * dp)) over each row: the gradient of the scores given the
// probabilities p and their gradient dp. Masked keys have p = 0, so ds = 0 there.
template <typename T>
__device__ void causal_softmax_bwd(const T *p, const T *dp, T *ds, int cols, int t_q, int offset,
                                   float scale) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const T *y = p + row * cols;
    const T *dy = dp + row * cols;
    T *dx = ds + row * cols;
    const int limit = causal_limit((int)row, cols, t_q, offset);
    float dot = 0.f;
    for (int j = threadIdx.x; j < limit; j += blockDim.x) dot += to_f(y[j]) * to_f(dy[j]);
    dot = block_sum(dot, scratch);
    for (int j = threadIdx.x; j < cols; j += blockDim.x)
        dx[j] = from_f<T>(j < limit ? scale * to_f(y[j]) * (to_f(dy[j]) - dot) : 0.f);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// The same two functions with one warp per row and the row held in registers (at most
// 32 * PER_LANE columns): one read of the row instead of three, no block synchronisation.
// Blocks hold several rows (blockDim.x / 32).
template <typename T, int PER_LANE>
__device__ void causal_softmax_fwd_warp(const T *s, T *p, int rows, int cols, int t_q, int offset,
                                        float scale) {
    const int lane = threadIdx.x & 31;
    const size_t row = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= (size_t)rows) return;
    const T *x = s + row * cols;
    T *y = p + row * cols;
    const int limit = causal_limit((int)row, cols, t_q, offset);
    float v[PER_LANE];
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
        const int j = lane + 32 * i;
        v[i] = j < limit ? to_f(x[j]) * scale : -INFINITY;
        m = fmaxf(m, v[i]);
    }
    m = warp_max(m);
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
        const int j = lane + 32 * i;
        v[i] = j < limit ? expf(v[i] - m) : 0.f;
        sum += v[i];
    }
    const float inv = 1.f / warp_sum(sum);
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
        const int j = lane + 32 * i;
        if (j < cols) y[j] = from_f<T>(v[i] * inv);
    }
}

template <typename T, int PER_LANE>
__device__ void causal_softmax_bwd_warp(const T *p, const T *dp, T *ds, int rows, int cols, int t_q,
                                        int offset, float scale) {
    const int lane = threadIdx.x & 31;
    const size_t row = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= (size_t)rows) return;
    const T *y = p + row * cols;
    const T *dy = dp + row * cols;
    T *dx = ds + row * cols;
    const int limit = causal_limit((int)row, cols, t_q, offset);
    float a[PER_LANE], b[PER_LANE];
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
        const int j = lane + 32 * i;
        a[i] = j < limit ? to_f(y[j]) : 0.f;
        b[i] = j < limit ? to_f(dy[j]) : 0.f;
        dot += a[i] * b[i];
    }
    dot = warp_sum(dot);
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
        const int j = lane + 32 * i;
        if (j < cols) dx[j] = from_f<T>(j < limit ? scale * a[i] * (b[i] - dot) : 0.f);
    }
}

// y = g * round(x * r), r = 1 / sqrt(mean(x^2) + eps): the normalised row is rounded to the
// storage type before the gain multiplies it, as the composed version and Hugging Face do.
template <typename T>
__device__ void rms_norm_fwd(const T *x, const T *g, T *y, int cols, float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const T *xr = x + row * cols;
    T *yr = y + row * cols;
    float ss = 0.f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        const float v = to_f(xr[j]);
        ss += v * v;
    }
    const float r = rsqrtf(block_sum(ss, scratch) / cols + eps);
    for (int j = threadIdx.x; j < cols; j += blockDim.x)
        yr[j] = from_f<T>(to_f(from_f<T>(to_f(xr[j]) * r)) * to_f(g[j]));
}

// dx = r * g * dy - x * r^3 * mean(g * dy * x); the gain is frozen and gets no gradient.
template <typename T>
__device__ void rms_norm_bwd(const T *x, const T *g, const T *dy, T *dx, int cols, float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const T *xr = x + row * cols;
    const T *dyr = dy + row * cols;
    T *dxr = dx + row * cols;
    float ss = 0.f, dot = 0.f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        const float v = to_f(xr[j]);
        ss += v * v;
        dot += to_f(g[j]) * to_f(dyr[j]) * v;
    }
    ss = block_sum(ss, scratch);
    dot = block_sum(dot, scratch);
    const float r = rsqrtf(ss / cols + eps);
    const float k = r * r * r * dot / cols;
    for (int j = threadIdx.x; j < cols; j += blockDim.x)
        dxr[j] = from_f<T>(r * to_f(g[j]) * to_f(dyr[j]) - to_f(xr[j]) * k);
}

// Moves a (batch, heads, t, d) tensor between the token-major layout (batch, t, heads, d), which
// projections produce and consume, and the heads-major layout (batch, heads, t, d) attention
// works in, applying the rotary embedding ("rotate half" pairs (c, c + d/2)) on the way when
// `rotate` is set: cos and sin are (t, d / 2) in f32; sign = -1 rotates backwards, which is the
// transpose (the backward). `src_tm` / `dst_tm` say whether each side is token-major.
template <typename T>
__device__ void heads_apply(const T *x, const float *cos, const float *sin, T *y, int batch,
                            int heads, int t, int d, float sign, int rotate, int src_tm,
                            int dst_tm) {
    const int half = d / 2;
    const size_t pairs = (size_t)batch * heads * t * half;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < pairs;
         i += (size_t)gridDim.x * blockDim.x) {
        const int col = (int)(i % half);
        size_t rest = i / half;
        const int pos = (int)(rest % t);
        rest /= t;
        const int h = (int)(rest % heads);
        const size_t b = rest / heads;
        const size_t heads_major = ((b * heads + h) * t + pos) * d;
        const size_t tokens_major = ((b * t + pos) * heads + h) * d;
        const size_t src = src_tm ? tokens_major : heads_major;
        const size_t dst = dst_tm ? tokens_major : heads_major;
        const float x1 = to_f(x[src + col]), x2 = to_f(x[src + col + half]);
        if (rotate) {
            const float c = cos[pos * half + col], s = sign * sin[pos * half + col];
            y[dst + col] = from_f<T>(x1 * c - x2 * s);
            y[dst + col + half] = from_f<T>(x2 * c + x1 * s);
        } else {
            y[dst + col] = x[src + col];
            y[dst + col + half] = x[src + col + half];
        }
    }
}

__device__ __forceinline__ float sigmoid(float v) { return 1.f / (1.f + expf(-v)); }

// h = silu(gate) * up. Elements go in packs of 16 bytes (8 bf16 / f16, 4 f32) when the
// count and the pointers allow, one at a time otherwise.
template <typename T> struct Pack {
    static constexpr int N = 16 / sizeof(T);
    uint4 raw;
    __device__ __forceinline__ T &operator[](int i) { return reinterpret_cast<T *>(&raw)[i]; }
};

__device__ __forceinline__ bool packable(size_t n, int per_pack, const void *a, const void *b,
                                         const void *c, const void *d) {
    const uintptr_t any = (uintptr_t)a | (uintptr_t)b | (uintptr_t)c | (uintptr_t)d;
    return n % per_pack == 0 && (any & 15) == 0;
}

__device__ __forceinline__ float swiglu_value(float g, float u) { return g * sigmoid(g) * u; }

template <typename T>
__device__ void swiglu_fwd(const T *gate, const T *up, T *h, size_t n) {
    constexpr int N = Pack<T>::N;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    const size_t first = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (packable(n, N, gate, up, h, h)) {
        for (size_t i = first; i < n / N; i += stride) {
            Pack<T> g, u, o;
            g.raw = reinterpret_cast<const uint4 *>(gate)[i];
            u.raw = reinterpret_cast<const uint4 *>(up)[i];
#pragma unroll
            for (int k = 0; k < N; ++k) o[k] = from_f<T>(swiglu_value(to_f(g[k]), to_f(u[k])));
            reinterpret_cast<uint4 *>(h)[i] = o.raw;
        }
        return;
    }
    for (size_t i = first; i < n; i += stride) h[i] = from_f<T>(swiglu_value(to_f(gate[i]), to_f(up[i])));
}

// grads = [d gate; d up] (2n elements): d gate = dh * up * s * (1 + g * (1 - s)),
// d up = dh * g * s, with s = sigmoid(g).
template <typename T>
__device__ void swiglu_bwd(const T *gate, const T *up, const T *dh, T *grads, size_t n) {
    constexpr int N = Pack<T>::N;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    const size_t first = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (packable(n, N, gate, up, dh, grads)) {
        for (size_t i = first; i < n / N; i += stride) {
            Pack<T> g, u, d, dg, du;
            g.raw = reinterpret_cast<const uint4 *>(gate)[i];
            u.raw = reinterpret_cast<const uint4 *>(up)[i];
            d.raw = reinterpret_cast<const uint4 *>(dh)[i];
#pragma unroll
            for (int k = 0; k < N; ++k) {
                const float gv = to_f(g[k]), uv = to_f(u[k]), dv = to_f(d[k]);
                const float sg = sigmoid(gv);
                dg[k] = from_f<T>(dv * uv * sg * (1.f + gv * (1.f - sg)));
                du[k] = from_f<T>(dv * gv * sg);
            }
            reinterpret_cast<uint4 *>(grads)[i] = dg.raw;
            reinterpret_cast<uint4 *>(grads + n)[i] = du.raw;
        }
        return;
    }
    for (size_t i = first; i < n; i += stride) {
        const float g = to_f(gate[i]), u = to_f(up[i]), d = to_f(dh[i]);
        const float sg = sigmoid(g);
        grads[i] = from_f<T>(d * u * sg * (1.f + g * (1.f - sg)));
        grads[n + i] = from_f<T>(d * g * sg);
    }
}

// y = x + bias[column] over rows of `cols`.
template <typename T>
__device__ void add_bias(const T *x, const T *bias, T *y, size_t n, int cols) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = from_f<T>(to_f(x[i]) + to_f(bias[i % cols]));
}

// Cross-entropy of each row of logits at its target: loss = logsumexp(x) - x[target], in f32,
// and the log-sum-exp itself (for the backward): out = [loss; lse], 2 * rows. One read of the
// row: each thread keeps a running maximum and the sum of exponentials relative to it, merged
// across the block.
template <typename T>
__device__ void cross_entropy_fwd(const T *logits, const uint32_t *targets, float *out, int rows,
                                  int cols) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const T *x = logits + row * cols;
    float m = -INFINITY, sum = 0.f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        const float v = to_f(x[j]);
        if (v > m) {
            sum = sum * expf(m - v) + 1.f;
            m = v;
        } else {
            sum += expf(v - m);
        }
    }
    const float block_m = block_max(m, scratch);
    sum = block_sum(m == -INFINITY ? 0.f : sum * expf(m - block_m), scratch);
    // A target outside the vocabulary gives NaN, which the training loop reports, rather than
    // a read out of bounds.
    const uint32_t t = targets[row];
    if (threadIdx.x == 0) {
        const float l = logf(sum) + block_m;
        out[rows + row] = l;
        out[row] = t < (uint32_t)cols ? l - to_f(x[t]) : NAN;
    }
}

// d logits = dloss[row] * (exp(x - lse[row]) - onehot(target)) with packed = [dloss; lse]:
// one read, one write.
template <typename T>
__device__ void cross_entropy_bwd(const T *logits, const uint32_t *targets, const float *packed,
                                  T *dlogits, int rows, int cols) {
    const size_t row = blockIdx.x;
    const T *x = logits + row * cols;
    T *dx = dlogits + row * cols;
    const float g = packed[row], l = packed[rows + row];
    const int target = (int)targets[row];
    for (int j = threadIdx.x; j < cols; j += blockDim.x)
        dx[j] = from_f<T>(g * (expf(to_f(x[j]) - l) - (j == target ? 1.f : 0.f)));
}

#define WARP_SOFTMAX(T, SUFFIX, PER_LANE)                                                       \
    extern "C" __global__ void causal_softmax_fwd_w##PER_LANE##_##SUFFIX(                       \
        const T *s, T *p, int rows, int cols, int t_q, int offset, float scale) {               \
        causal_softmax_fwd_warp<T, PER_LANE>(s, p, rows, cols, t_q, offset, scale);             \
    }                                                                                           \
    extern "C" __global__ void causal_softmax_bwd_w##PER_LANE##_##SUFFIX(                       \
        const T *p, const T *dp, T *ds, int rows, int cols, int t_q, int offset, float scale) { \
        causal_softmax_bwd_warp<T, PER_LANE>(p, dp, ds, rows, cols, t_q, offset, scale);        \
    }

#define ROW_KERNELS(T, SUFFIX)                                                                  \
    extern "C" __global__ void causal_softmax_fwd_##SUFFIX(const T *s, T *p, int cols, int t_q, \
                                                           int offset, float scale) {           \
        causal_softmax_fwd<T>(s, p, cols, t_q, offset, scale);                                  \
    }                                                                                           \
    extern "C" __global__ void causal_softmax_bwd_##SUFFIX(const T *p, const T *dp, T *ds,      \
                                                           int cols, int t_q, int offset,       \
                                                           float scale) {                       \
        causal_softmax_bwd<T>(p, dp, ds, cols, t_q, offset, scale);                             \
    }                                                                                           \
    extern "C" __global__ void rms_norm_fwd_##SUFFIX(const T *x, const T *g, T *y, int cols,    \
                                                     float eps) {                               \
        rms_norm_fwd<T>(x, g, y, cols, eps);                                                    \
    }                                                                                           \
    extern "C" __global__ void rms_norm_bwd_##SUFFIX(const T *x, const T *g, const T *dy, T *dx, \
                                                     int cols, float eps) {                     \
        rms_norm_bwd<T>(x, g, dy, dx, cols, eps);                                               \
    }                                                                                           \
    extern "C" __global__ void heads_##SUFFIX(const T *x, const float *cos, const float *sin,   \
                                              T *y, int batch, int heads, int t, int d,         \
                                              float sign, int rotate, int src_tm, int dst_tm) { \
        heads_apply<T>(x, cos, sin, y, batch, heads, t, d, sign, rotate, src_tm, dst_tm);       \
    }                                                                                           \
    extern "C" __global__ void swiglu_fwd_##SUFFIX(const T *gate, const T *up, T *h, size_t n) { \
        swiglu_fwd<T>(gate, up, h, n);                                                          \
    }                                                                                           \
    extern "C" __global__ void swiglu_bwd_##SUFFIX(const T *gate, const T *up, const T *dh,     \
                                                   T *grads, size_t n) {                        \
        swiglu_bwd<T>(gate, up, dh, grads, n);                                                  \
    }                                                                                           \
    extern "C" __global__ void cross_entropy_fwd_##SUFFIX(const T *logits,                      \
                                                          const uint32_t *targets, float *out,  \
                                                          int rows, int cols) {                 \
        cross_entropy_fwd<T>(logits, targets, out, rows, cols);                                 \
    }                                                                                           \
    extern "C" __global__ void cross_entropy_bwd_##SUFFIX(const T *logits,                      \
                                                          const uint32_t *targets,              \
                                                          const float *packed, T *dlogits,      \
                                                          int rows, int cols) {                 \
        cross_entropy_bwd<T>(logits, targets, packed, dlogits, rows, cols);                     \
    }                                                                                           \
    extern "C" __global__ void add_bias_##SUFFIX(const T *x, const T *bias, T *y, size_t n,     \
                                                 int cols) {                                    \
        add_bias<T>(x, bias, y, n, cols);                                                       \
    }                                                                                           \
    WARP_SOFTMAX(T, SUFFIX, 16)                                                                 \
    WARP_SOFTMAX(T, SUFFIX, 32)

ROW_KERNELS(float, f32)
ROW_KERNELS(__nv_bfloat16, bf16)
ROW_KERNELS(__half, f16)

// AdamW as PyTorch defines it, for one f32 parameter: p <- p * (1 - lr * wd), then
// p <- p - lr * m_hat / (sqrt(v_hat) + eps), with the gradient scaled by `clip` first.
// Writes [p; m; v] (3n) into `out`; the inputs are left untouched.
extern "C" __global__ void adamw_f32(const float *p, const float *g, const float *m,
                                     const float *v, float *out, size_t n, float lr, float beta1,
                                     float beta2, float eps, float wd, float bias1, float bias2,
                                     float clip) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float grad = g[i] * clip;
        const float m1 = beta1 * m[i] + (1.f - beta1) * grad;
        const float v1 = beta2 * v[i] + (1.f - beta2) * grad * grad;
        const float update = (m1 / bias1) / (sqrtf(v1 / bias2) + eps);
        out[i] = p[i] * (1.f - lr * wd) - lr * update;
        out[n + i] = m1;
        out[2 * n + i] = v1;
    }
}
