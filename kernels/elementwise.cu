// elementwise.cu: SiLU, tanh-GELU, add, bias add over rows, gated residual add.
// Argument structs and exact semantics: qc_types.h.
#include "common.cuh"

namespace qc {

// x / (1 + exp(-x)), as PyTorch's silu.
struct SiluOp {
    __device__ __forceinline__ float operator()(float x) const { return x / (1.0f + expf(-x)); }
};

// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as PyTorch's gelu(approximate="tanh").
struct GeluTanhOp {
    __device__ __forceinline__ float operator()(float x) const {
        const float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
        const float kKappa = 0.044715f;
        const float inner = kBeta * (x + kKappa * (x * x * x));
        return 0.5f * x * (1.0f + tanhf(inner));
    }
};

// y[i] = op(x[i]) for i < n, grid-stride; 16-byte vectors when both pointers
// are 16-byte aligned, scalar tail. y may equal x (not __restrict__).
template <typename T, typename Op>
__device__ __forceinline__ void unary(const QcUnaryArgs& a, Op op) {
    constexpr int V = Vec16<T>::N;
    const T* x = dev_ptr<const T>(a.x);
    T* y = dev_ptr<T>(a.y);
    const int64_t tid = global_thread_id();
    const int64_t stride = global_thread_count();
    const int64_t nvec = (aligned16(x) && aligned16(y)) ? a.n / V : 0;
    for (int64_t i = tid; i < nvec; i += stride) {
        float v[V];
        load_f32<V>(x, i, v);
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] = op(v[j]);
        store_f32<V>(y, i, v);
    }
    for (int64_t i = nvec * V + tid; i < a.n; i += stride) y[i] = from_f32<T>(op(to_f32(x[i])));
}

// y[i] = a[i] + b[i], grid-stride; y may equal a and/or b.
template <typename T>
__device__ __forceinline__ void add(const QcBinaryArgs& a) {
    constexpr int V = Vec16<T>::N;
    const T* pa = dev_ptr<const T>(a.a);
    const T* pb = dev_ptr<const T>(a.b);
    T* y = dev_ptr<T>(a.y);
    const int64_t tid = global_thread_id();
    const int64_t stride = global_thread_count();
    const int64_t nvec = (aligned16(pa) && aligned16(pb) && aligned16(y)) ? a.n / V : 0;
    for (int64_t i = tid; i < nvec; i += stride) {
        float u[V], v[V];
        load_f32<V>(pa, i, u);
        load_f32<V>(pb, i, v);
#pragma unroll
        for (int j = 0; j < V; ++j) u[j] += v[j];
        store_f32<V>(y, i, u);
    }
    for (int64_t i = nvec * V + tid; i < a.n; i += stride)
        y[i] = from_f32<T>(to_f32(pa[i]) + to_f32(pb[i]));
}

// y[r, c] = x[r, c] + bias[c]: one block per row, V elements per access.
template <typename T, int V>
__device__ __forceinline__ void bias_add_rows(const QcBiasAddArgs& a) {
    const T* x = dev_ptr<const T>(a.x);
    const T* __restrict__ bias = dev_ptr<const T>(a.bias);
    T* y = dev_ptr<T>(a.y);
    const int nv = a.cols / V;
    for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
        const T* xr = x + r * a.cols;
        T* yr = y + r * a.cols;
        for (int i = threadIdx.x; i < nv; i += blockDim.x) {
            float u[V], v[V];
            load_f32<V>(xr, i, u);
            load_f32<V>(bias, i, v);
#pragma unroll
            for (int j = 0; j < V; ++j) u[j] += v[j];
            store_f32<V>(yr, i, u);
        }
    }
}

template <typename T>
__device__ __forceinline__ void bias_add(const QcBiasAddArgs& a) {
    constexpr int V = Vec16<T>::N;
    if (a.cols % V == 0 && aligned16(dev_ptr<const T>(a.x)) &&
        aligned16(dev_ptr<const T>(a.bias)) && aligned16(dev_ptr<const T>(a.y)))
        bias_add_rows<T, V>(a);
    else
        bias_add_rows<T, 1>(a);
}

// x[r, c] += gate[e(r), c] * y[r, c] (qc_types.h; gate f32, or absent): one block per row.
// bf16 rounds the product before the add, as PyTorch's x + gate * y.
template <typename T, int V>
__device__ __forceinline__ void gated_residual_rows(const QcGatedResidualArgs& a) {
    T* __restrict__ x = dev_ptr<T>(a.x);
    const T* __restrict__ y = dev_ptr<const T>(a.y);
    const float* __restrict__ gate = dev_ptr<const float>(a.gate);
    const int* __restrict__ gi = dev_ptr<const int>(a.group_index);
    const int nv = a.cols / V;
    for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
        T* xr = x + r * a.cols;
        const T* yr = y + r * a.cols;
        const int64_t g0 = r / a.group_size;
        const float* gr = gate ? gate + (gi ? gi[g0] : g0) * a.gate_stride : nullptr;
        for (int i = threadIdx.x; i < nv; i += blockDim.x) {
            float u[V], v[V], g[V];
            load_f32<V>(xr, i, u);
            load_f32<V>(yr, i, v);
#pragma unroll
            for (int j = 0; j < V; ++j) g[j] = gr ? gr[i * V + j] : 1.0f;
#pragma unroll
            for (int j = 0; j < V; ++j) u[j] += round_to<T>(g[j] * v[j]);
            store_f32<V>(xr, i, u);
        }
    }
}

template <typename T>
__device__ __forceinline__ void gated_residual(const QcGatedResidualArgs& a) {
    constexpr int V = Vec16<T>::N;
    // x and y in 16-byte vectors when every row allows it (the f32 gate is read per element).
    if (a.cols % V == 0 && aligned16(dev_ptr<const T>(a.x)) && aligned16(dev_ptr<const T>(a.y)))
        gated_residual_rows<T, V>(a);
    else
        gated_residual_rows<T, 1>(a);
}

}  // namespace qc

// y = silu(x) = x / (1 + exp(-x)), flat, f32.
extern "C" __global__ void __launch_bounds__(1024) qc_silu_f32(const QcUnaryArgs a) {
    qc::unary<float>(a, qc::SiluOp());
}
// y = silu(x) = x / (1 + exp(-x)), flat, bf16.
extern "C" __global__ void __launch_bounds__(1024) qc_silu_bf16(const QcUnaryArgs a) {
    qc::unary<qc::bf16>(a, qc::SiluOp());
}
// y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), flat, f32.
extern "C" __global__ void __launch_bounds__(1024) qc_gelu_tanh_f32(const QcUnaryArgs a) {
    qc::unary<float>(a, qc::GeluTanhOp());
}
// y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), flat, bf16.
extern "C" __global__ void __launch_bounds__(1024) qc_gelu_tanh_bf16(const QcUnaryArgs a) {
    qc::unary<qc::bf16>(a, qc::GeluTanhOp());
}
// y = a + b, flat, f32.
extern "C" __global__ void __launch_bounds__(1024) qc_add_f32(const QcBinaryArgs a) {
    qc::add<float>(a);
}
// y = a + b, flat, bf16.
extern "C" __global__ void __launch_bounds__(1024) qc_add_bf16(const QcBinaryArgs a) {
    qc::add<qc::bf16>(a);
}
// y[r, :] = x[r, :] + bias, f32.
extern "C" __global__ void __launch_bounds__(1024) qc_bias_add_f32(const QcBiasAddArgs a) {
    qc::bias_add<float>(a);
}
// y[r, :] = x[r, :] + bias, bf16.
extern "C" __global__ void __launch_bounds__(1024) qc_bias_add_bf16(const QcBiasAddArgs a) {
    qc::bias_add<qc::bf16>(a);
}
// x[r, :] += gate[r / rows_per_sample, :] * y[r, :], f32.
extern "C" __global__ void __launch_bounds__(1024) qc_gated_residual_f32(const QcGatedResidualArgs a) {
    qc::gated_residual<float>(a);
}
// x[r, :] += gate[r / rows_per_sample, :] * y[r, :], bf16.
extern "C" __global__ void __launch_bounds__(1024) qc_gated_residual_bf16(const QcGatedResidualArgs a) {
    qc::gated_residual<qc::bf16>(a);
}
