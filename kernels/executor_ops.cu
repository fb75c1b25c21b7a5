// executor_ops.cu: small elementwise ops of the CUDA backend (multiply, CFG
// guidance, the sampler's Euler step) that the other kernels do not cover.
// Argument structs and exact semantics: qc_types.h (executor_ops.cu section).
// Flat scalar grid-stride loops (launch_cfg::flat_scalar: 256 threads).
#include "common.cuh"

namespace qc {
namespace exec {

template <typename T>
__device__ __forceinline__ void mul(const QcBinaryArgs& a) {
    const T* pa = dev_ptr<const T>(a.a);
    const T* pb = dev_ptr<const T>(a.b);
    T* y = dev_ptr<T>(a.y);
    for (int64_t i = global_thread_id(); i < a.n; i += global_thread_count())
        y[i] = from_f32<T>(__fmul_rn(to_f32(pa[i]), to_f32(pb[i])));
}

template <typename T>
__device__ __forceinline__ void guidance(const QcGuidanceArgs& a) {
    const T* c = dev_ptr<const T>(a.cond);
    const T* u = dev_ptr<const T>(a.uncond);
    T* y = dev_ptr<T>(a.y);
    for (int64_t i = global_thread_id(); i < a.n; i += global_thread_count()) {
        const float cv = to_f32(c[i]);
        const float uv = to_f32(u[i]);
        // The CPU's u + scale * (c - u), each operation rounded (no FMA).
        y[i] = from_f32<T>(__fadd_rn(uv, __fmul_rn(a.scale, __fsub_rn(cv, uv))));
    }
}

template <typename T>
__device__ __forceinline__ void axpby(const QcAxpbyArgs& p) {
    const T* x = dev_ptr<const T>(p.x);
    const T* y = dev_ptr<const T>(p.y);
    T* out = dev_ptr<T>(p.out);
    for (int64_t i = global_thread_id(); i < p.n; i += global_thread_count())
        out[i] = from_f32<T>(__fadd_rn(__fmul_rn(p.a, to_f32(x[i])), __fmul_rn(p.b, to_f32(y[i]))));
}

__device__ __forceinline__ void euler(const QcEulerArgs& a) {
    float* __restrict__ z = dev_ptr<float>(a.z);
    const float* __restrict__ v = dev_ptr<const float>(a.v);
    const float* __restrict__ dt = dev_ptr<const float>(a.dt);
    for (int64_t i = global_thread_id(); i < a.n; i += global_thread_count())
        z[i] = __fadd_rn(z[i], __fmul_rn(v[i], dt[i / a.per_sample]));
}

}  // namespace exec
}  // namespace qc

// y = a * b, flat, f32.
extern "C" __global__ void __launch_bounds__(256) qc_mul_f32(const QcBinaryArgs a) {
    qc::exec::mul<float>(a);
}
// y = a * b, flat, bf16.
extern "C" __global__ void __launch_bounds__(256) qc_mul_bf16(const QcBinaryArgs a) {
    qc::exec::mul<qc::bf16>(a);
}
// y = uncond + scale (cond - uncond), flat, f32.
extern "C" __global__ void __launch_bounds__(256) qc_guidance_f32(const QcGuidanceArgs a) {
    qc::exec::guidance<float>(a);
}
// y = uncond + scale (cond - uncond), flat, bf16.
extern "C" __global__ void __launch_bounds__(256) qc_guidance_bf16(const QcGuidanceArgs a) {
    qc::exec::guidance<qc::bf16>(a);
}
// out = a x + b y, flat, f32.
extern "C" __global__ void __launch_bounds__(256) qc_axpby_f32(const QcAxpbyArgs a) {
    qc::exec::axpby<float>(a);
}
// out = a x + b y, flat, bf16.
extern "C" __global__ void __launch_bounds__(256) qc_axpby_bf16(const QcAxpbyArgs a) {
    qc::exec::axpby<qc::bf16>(a);
}
// z += v * dt[i / per_sample], flat, f32.
extern "C" __global__ void __launch_bounds__(256) qc_euler_f32(const QcEulerArgs a) {
    qc::exec::euler(a);
}
