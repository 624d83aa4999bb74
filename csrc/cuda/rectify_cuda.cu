// Fused rectifier + per-channel ON counting (and, for rectify_count_entropy, the entropy proxy's
// per-channel sums) on CUDA: one pass with 16-byte loads, counts and sums kept in registers,
// reduced per block in shared memory and flushed with one atomic per channel per block. The entropy
// proxy is a compile-time flag (E), so rectify_count's kernels are the same code as without it.
// Runs on the current stream and never synchronises with the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "rectify_args.h"

namespace easier_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kMaxGrid = 65535;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T val[N];
};

// The same formulas as the CPU kernel; the piecewise-linear ones are written as comparisons so
// NaN and -0.0 come out exactly as on the CPU (x < 0 ? 0 : x keeps both).
template <Activation A, typename T>
__device__ __forceinline__ T activate(T x, T slope) {
  if constexpr (A == Activation::ReLU) {
    return x < T(0) ? T(0) : x;
  } else if constexpr (A == Activation::ReLU6) {
    const T t = x < T(0) ? T(0) : x;
    return T(6) < t ? T(6) : t;
  } else if constexpr (A == Activation::LeakyReLU || A == Activation::PReLU) {
    return x > T(0) ? x : x * slope;
  } else if constexpr (A == Activation::GELU) {
    return x * T(0.5) * (T(1) + ::erf(x * T(M_SQRT1_2)));
  } else if constexpr (A == Activation::GELUTanh) {
    const T inner = T(M_SQRT2 * M_2_SQRTPI * 0.5) * (x + T(0.044715) * (x * x * x));
    return T(0.5) * x * (T(1) + ::tanh(inner));
  } else if constexpr (A == Activation::SiLU) {
    return x / (T(1) + ::exp(-x));
  } else if constexpr (A == Activation::Hardswish) {
    // As torch's CUDA kernel: times 1/6 (its CPU kernel divides by 6; the two differ in the last bit).
    const T t = x + T(3);
    const T clamped = t < T(0) ? T(0) : (T(6) < t ? T(6) : t);  // max/min as comparisons keep NaN
    return x * clamped * T(1.0 / 6.0);
  } else if constexpr (A == Activation::ELU) {
    return x <= T(0) ? ::expm1(x) * slope : x;
  } else {
    static_assert(A == Activation::Mish);
    return x * ::tanh(::log1p(::exp(x)));
  }
}

// The binary entropy, in nats, of sigmoid(x * inv_tau), in the CPU kernel's cancellation-free form
// log1p(e) + a * e / (1 + e), a = |x * inv_tau|, e = exp(-a): NaN gives NaN, +-inf gives 0.
template <typename T>
__device__ __forceinline__ T entropy_nats(T x, T inv_tau) {
  const T a = ::fabs(x * inv_tau);
  const T e = ::exp(-a);
  const T q = e / (T(1) + e);
  return ::log1p(e) + q * ::fmin(a, std::numeric_limits<T>::max());
}

template <typename scalar_t, typename opmath>
__device__ __forceinline__ opmath channel_slope(const scalar_t* weight, bool shared_weight, opmath slope,
                                                int64_t c) {
  return weight == nullptr ? slope : static_cast<opmath>(weight[shared_weight ? 0 : c]);
}

// inner == 1: rows of `channels` contiguous values. threadIdx.x walks channel vectors (coalesced
// along a row), threadIdx.y and blockIdx.y walk rows, so each thread counts fixed channels. With E,
// `entropy` gets each channel's entropy proxy in bits (the block's sum in nats, times log2(e)).
template <typename scalar_t, Activation A, int VEC, bool E>
__global__ void __launch_bounds__(kThreads)
    rows_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, const scalar_t* __restrict__ weight,
                bool shared_weight, at::opmath_type<scalar_t> slope, int64_t rows, int64_t channels,
                unsigned long long* __restrict__ counts, at::opmath_type<scalar_t>* __restrict__ entropy,
                at::opmath_type<scalar_t> inv_tau) {
  using opmath = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  __shared__ unsigned long long block_counts[kWarp * VEC];
  __shared__ opmath block_nats[E ? kWarp * VEC : 1];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int nthreads = blockDim.x * blockDim.y;
  const int block_channels = blockDim.x * VEC;
  for (int i = tid; i < block_channels; i += nthreads) {
    block_counts[i] = 0;
    if constexpr (E) block_nats[i] = opmath(0);
  }
  __syncthreads();

  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c0 < channels) {
    opmath s[VEC];
    unsigned long long on[VEC];
    opmath nats[VEC];  // only read and written with E
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      s[i] = channel_slope(weight, shared_weight, slope, c0 + i);
      on[i] = 0;
      nats[i] = opmath(0);
    }
    const int64_t row_step = static_cast<int64_t>(gridDim.y) * blockDim.y;
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < rows; r += row_step) {
      const int64_t off = r * channels + c0;
      const P v = *reinterpret_cast<const P*>(in + off);
      P o;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const opmath x = static_cast<opmath>(v.val[i]);
        on[i] += x > opmath(0);
        if constexpr (E) nats[i] += entropy_nats(x, inv_tau);
        o.val[i] = static_cast<scalar_t>(activate<A>(x, s[i]));
      }
      *reinterpret_cast<P*>(out + off) = o;
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      if (on[i]) atomicAdd(&block_counts[threadIdx.x * VEC + i], on[i]);
      if constexpr (E) {
        if (nats[i] != opmath(0)) atomicAdd(&block_nats[threadIdx.x * VEC + i], nats[i]);  // NaN is != 0
      }
    }
  }
  __syncthreads();
  for (int i = tid; i < block_channels; i += nthreads) {
    const int64_t c = static_cast<int64_t>(blockIdx.x) * block_channels + i;
    if (c < channels && block_counts[i]) atomicAdd(counts + c, block_counts[i]);
    if constexpr (E) {
      if (c < channels && block_nats[i] != opmath(0)) atomicAdd(entropy + c, block_nats[i] * opmath(M_LOG2E));
    }
  }
}

// inner > 1: each (outer, channel) pair is a contiguous plane. blockIdx.y picks the channel, so a
// block counts one channel at a time; blockIdx.x and the threads walk that channel's planes. With E,
// `entropy` gets each channel's entropy proxy in bits, as in rows_kernel.
template <typename scalar_t, Activation A, int VEC, bool E>
__global__ void __launch_bounds__(kThreads)
    planes_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, const scalar_t* __restrict__ weight,
                  bool shared_weight, at::opmath_type<scalar_t> slope, int64_t outer, int64_t channels, int64_t inner,
                  unsigned long long* __restrict__ counts, at::opmath_type<scalar_t>* __restrict__ entropy,
                  at::opmath_type<scalar_t> inv_tau) {
  using opmath = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  __shared__ unsigned long long warp_counts[kThreads / kWarp];
  __shared__ opmath warp_nats[E ? kThreads / kWarp : 1];
  const int64_t vec_inner = inner / VEC;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  for (int64_t c = blockIdx.y; c < channels; c += gridDim.y) {
    const opmath s = channel_slope(weight, shared_weight, slope, c);
    unsigned long long on = 0;
    opmath nats = 0;  // only read and written with E
    for (int64_t o = blockIdx.x; o < outer; o += gridDim.x) {
      const int64_t base = (o * channels + c) * inner;
      for (int64_t j = threadIdx.x; j < vec_inner; j += blockDim.x) {
        const int64_t off = base + j * VEC;
        const P v = *reinterpret_cast<const P*>(in + off);
        P r;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const opmath x = static_cast<opmath>(v.val[i]);
          on += x > opmath(0);
          if constexpr (E) nats += entropy_nats(x, inv_tau);
          r.val[i] = static_cast<scalar_t>(activate<A>(x, s));
        }
        *reinterpret_cast<P*>(out + off) = r;
      }
    }
#pragma unroll
    for (int d = kWarp / 2; d > 0; d /= 2) {
      on += __shfl_down_sync(0xffffffffu, on, d);
      if constexpr (E) nats += __shfl_down_sync(0xffffffffu, nats, d);
    }
    if (lane == 0) {
      warp_counts[warp] = on;
      if constexpr (E) warp_nats[warp] = nats;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned long long total = 0;
      for (int w = 0; w < static_cast<int>(blockDim.x / kWarp); ++w) total += warp_counts[w];
      if (total) atomicAdd(counts + c, total);
      if constexpr (E) {
        opmath total_nats = 0;
        for (int w = 0; w < static_cast<int>(blockDim.x / kWarp); ++w) total_nats += warp_nats[w];
        if (total_nats != opmath(0)) atomicAdd(entropy + c, total_nats * opmath(M_LOG2E));  // NaN is != 0
      }
    }
    __syncthreads();
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int next_pow2(int64_t v, int cap) {
  int p = 1;
  while (p < v && p < cap) p *= 2;
  return p;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename scalar_t, Activation A, int VEC, bool E>
void launch(const RectifyPlan& plan, unsigned long long* counts, at::opmath_type<scalar_t>* entropy,
            cudaStream_t stream) {
  using opmath = at::opmath_type<scalar_t>;
  const auto [outer, channels, inner] = plan.layout;
  const scalar_t* in = plan.input.const_data_ptr<scalar_t>();
  scalar_t* out = plan.output.mutable_data_ptr<scalar_t>();
  const scalar_t* weight = plan.weight ? plan.weight->const_data_ptr<scalar_t>() : nullptr;
  const bool shared_weight = plan.weight && plan.weight->numel() == 1;
  const auto slope = static_cast<opmath>(plan.alpha);
  const auto inv_tau = inverse_tau<opmath>(plan);
  // Enough resident blocks to fill every SM a few times over, no more: each extra block costs
  // one atomic per channel.
  const int64_t target = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;

  if (inner == 1) {
    const int64_t vec_channels = channels / VEC;
    const int tx = next_pow2(vec_channels, kWarp);
    const int ty = kThreads / tx;
    const int64_t gx = ceil_div(vec_channels, tx);
    const int64_t gy = std::clamp<int64_t>(ceil_div(target, gx), 1, std::min<int64_t>(ceil_div(outer, ty), kMaxGrid));
    rows_kernel<scalar_t, A, VEC, E><<<dim3(gx, gy), dim3(tx, ty), 0, stream>>>(
        in, out, weight, shared_weight, slope, outer, channels, counts, entropy, inv_tau);
  } else {
    const int threads = std::max(kWarp, next_pow2(inner / VEC, kThreads));
    const int64_t gy = std::min<int64_t>(channels, kMaxGrid);
    const int64_t gx = std::clamp<int64_t>(ceil_div(target, gy), 1, std::min<int64_t>(outer, kMaxGrid));
    planes_kernel<scalar_t, A, VEC, E><<<dim3(gx, gy), threads, 0, stream>>>(
        in, out, weight, shared_weight, slope, outer, channels, inner, counts, entropy, inv_tau);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs the kernels of `plan` into `counts` and, for an entropy plan, `entropy` (both zeroed, on the
// input's device, under its guard).
void run_kernels(const RectifyPlan& plan, at::Tensor& counts, at::Tensor* entropy) {
  TORCH_INTERNAL_ASSERT(plan.tau.has_value() == (entropy != nullptr));
  if (plan.input.numel() == 0) return;
  auto* count_ptr = reinterpret_cast<unsigned long long*>(counts.mutable_data_ptr<int64_t>());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto [outer, channels, inner] = plan.layout;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.input.scalar_type(), "rectify_count_cuda", [&] {
    using opmath = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    // 16-byte loads need whole vectors inside one channel's block and aligned addresses.
    const int64_t run = inner == 1 ? channels : inner;
    const bool vectorize = run % kVec == 0 && aligned16(plan.input.const_data_ptr()) &&
                           aligned16(plan.output.const_data_ptr());
    opmath* entropy_ptr = entropy ? entropy->mutable_data_ptr<opmath>() : nullptr;
    dispatch_activation(plan.activation, [&](auto act) {
      constexpr Activation A = decltype(act)::value;
      auto with = [&](auto with_entropy) {
        constexpr bool E = decltype(with_entropy)::value;
        if (vectorize) {
          launch<scalar_t, A, kVec, E>(plan, count_ptr, entropy_ptr, stream);
        } else {
          launch<scalar_t, A, 1, E>(plan, count_ptr, entropy_ptr, stream);
        }
      };
      if (entropy_ptr) {
        with(std::true_type{});
      } else {
        with(std::false_type{});
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> rectify_count_cuda(const at::Tensor& input, c10::string_view activation,
                                                       double alpha, const std::optional<at::Tensor>& weight,
                                                       int64_t channel_dim) {
  check_devices(input, weight);  // before the assert and the guard, which need a CUDA input
  TORCH_INTERNAL_ASSERT(input.device().is_cuda());
  const c10::cuda::CUDAGuard device_guard(input.device());
  RectifyPlan plan = plan_rectify(input, std::string_view(activation.data(), activation.size()), alpha,
                                  weight, channel_dim);
  at::Tensor counts = at::zeros({plan.layout.channels}, input.options().dtype(at::kLong));
  run_kernels(plan, counts, nullptr);
  return {plan.output, counts};
}

// The sums have the kernels' accumulation type (entropy_sums_dtype), which the blocks' atomics add in.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rectify_count_entropy_cuda(const at::Tensor& input,
                                                                          c10::string_view activation, double alpha,
                                                                          const std::optional<at::Tensor>& weight,
                                                                          int64_t channel_dim, double tau) {
  check_devices(input, weight);  // before the assert and the guard, which need a CUDA input
  TORCH_INTERNAL_ASSERT(input.device().is_cuda());
  const c10::cuda::CUDAGuard device_guard(input.device());
  RectifyPlan plan = plan_rectify(input, std::string_view(activation.data(), activation.size()), alpha,
                                  weight, channel_dim, /*in_place=*/false, tau);
  at::Tensor counts = at::zeros({plan.layout.channels}, input.options().dtype(at::kLong));
  at::Tensor sums =
      at::zeros({plan.layout.channels}, input.options().dtype(entropy_sums_dtype(input.scalar_type())));
  run_kernels(plan, counts, &sums);
  return {plan.output, counts, sums};
}

// The kernels declare input and output __restrict__ (so loads may use the read-only cache): the
// in-place form runs them out of place and copies the result back, on the same stream.
at::Tensor rectify_count_inplace_cuda(at::Tensor& input, c10::string_view activation, double alpha,
                                      const std::optional<at::Tensor>& weight, int64_t channel_dim) {
  auto [output, counts] = rectify_count_cuda(input, activation, alpha, weight, channel_dim);
  input.copy_(output);
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(easier_ext, CUDA, m) {
  m.impl("rectify_count", &rectify_count_cuda);
  m.impl("rectify_count_", &rectify_count_inplace_cuda);
  m.impl("rectify_count_entropy", &rectify_count_entropy_cuda);
}

}  // namespace easier_ext
