// Fused rectifier + per-channel ON counting on the CPU: one pass, at::vec vectors, at::parallel_for
// threads, per-thread channel counts merged once. Compiled once per CPU capability.
#include "cpu/rectify_cpu_kernel.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>

#include <array>
#include <cmath>
#include <vector>

namespace easier_ext::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Enough elements per task that threading pays for itself.
constexpr int64_t kGrainElements = 32768;
// Vector lane counters are 32-bit for float math; merge them into int64 before they could wrap.
constexpr int64_t kFlushSteps = int64_t{1} << 28;

template <typename T>
constexpr bool kReduced = c10::is_reduced_floating_point_v<T>;

// Float math for half/bfloat16 (as ATen does), the type itself otherwise.
template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;

// A mask lane (all bits set) reinterpreted as an integer of the same width is -1.
template <typename scalar_t>
using count_t = std::conditional_t<sizeof(opmath_t<scalar_t>) == 8, int64_t, int32_t>;

// One step is one Vectorized<scalar_t>: 1 opmath vector for float/double, 2 for half/bfloat16.
template <typename scalar_t>
constexpr int64_t kStep = Vectorized<scalar_t>::size();
template <typename scalar_t>
constexpr int kParts = kReduced<scalar_t> ? 2 : 1;
template <typename scalar_t>
constexpr int64_t kPartLanes = Vectorized<opmath_t<scalar_t>>::size();

template <typename scalar_t>
using Parts = std::array<Vectorized<opmath_t<scalar_t>>, kParts<scalar_t>>;

template <typename scalar_t>
Parts<scalar_t> load(const scalar_t* p, int64_t n) {
  const auto raw = n == kStep<scalar_t> ? Vectorized<scalar_t>::loadu(p) : Vectorized<scalar_t>::loadu(p, n);
  if constexpr (kReduced<scalar_t>) {
    auto [a, b] = at::vec::convert_to_float<scalar_t>(raw);
    return {a, b};
  } else {
    return {raw};
  }
}

template <typename scalar_t>
void store(scalar_t* p, int64_t n, const Parts<scalar_t>& v) {
  Vectorized<scalar_t> raw;
  if constexpr (kReduced<scalar_t>) {
    raw = at::vec::convert_from_float<scalar_t>(v[0], v[1]);
  } else {
    raw = v[0];
  }
  if (n == kStep<scalar_t>) {
    raw.store(p);
  } else {
    raw.store(p, n);
  }
}

// The activations, written as ATen writes them so results match torch's (bit for bit for the
// piecewise-linear ones). `slope` is leaky_relu's negative_slope or prelu's weight per lane.
template <Activation A, typename T>
Vectorized<T> activate(const Vectorized<T>& x, const Vectorized<T>& slope) {
  const Vectorized<T> zero(T(0));
  const Vectorized<T> one(T(1));
  const Vectorized<T> half(T(0.5));
  if constexpr (A == Activation::ReLU) {
    return at::vec::clamp_min(x, zero);
  } else if constexpr (A == Activation::ReLU6) {
    return at::vec::clamp(x, zero, Vectorized<T>(T(6)));  // hardtanh(0, 6), as torch's relu6
  } else if constexpr (A == Activation::LeakyReLU || A == Activation::PReLU) {
    return Vectorized<T>::blendv(x * slope, x, x > zero);
  } else if constexpr (A == Activation::GELU) {
    return x * half * (one + (x * Vectorized<T>(T(M_SQRT1_2))).erf());
  } else if constexpr (A == Activation::GELUTanh) {
    const Vectorized<T> beta(T(M_SQRT2 * M_2_SQRTPI * 0.5));
    const Vectorized<T> kappa(T(0.044715));
    const auto inner = beta * (x + kappa * (x * x * x));
    return half * x * (one + inner.tanh());
  } else {
    static_assert(A == Activation::SiLU);
    return x / (one + x.neg().exp());
  }
}

// The per-lane slopes at `p` for the activations that have one, zero (unused) for the others.
template <Activation A, typename T>
Vectorized<T> load_slope(const T* p) {
  if constexpr (A == Activation::LeakyReLU || A == Activation::PReLU) {
    return Vectorized<T>::loadu(p);
  } else {
    return Vectorized<T>(T(0));
  }
}

// ON is z > 0: NaN and -0.0 count as OFF. Subtracting the all-ones mask adds 1 per ON lane.
template <typename T, typename C>
Vectorized<C> add_on(const Vectorized<C>& acc, const Vectorized<T>& x) {
  return acc - at::vec::cast<C>(x > Vectorized<T>(T(0)));
}

template <typename C>
int64_t lane_sum(const Vectorized<C>& v) {
  std::array<C, Vectorized<C>::size()> lanes;
  v.store(lanes.data());
  int64_t s = 0;
  for (C x : lanes) s += x;
  return s;
}

// Per-channel slopes in opmath, padded to whole steps so the rows kernel can load full vectors.
template <typename scalar_t>
std::vector<opmath_t<scalar_t>> channel_slopes(const RectifyPlan& plan, int64_t padded) {
  using opmath = opmath_t<scalar_t>;
  const int64_t channels = plan.layout.channels;
  std::vector<opmath> slopes(padded, opmath(0));
  if (plan.activation == Activation::LeakyReLU) {
    std::fill(slopes.begin(), slopes.begin() + channels, static_cast<opmath>(plan.negative_slope));
  } else if (plan.activation == Activation::PReLU) {
    const scalar_t* w = plan.weight->const_data_ptr<scalar_t>();
    const bool shared = plan.weight->numel() == 1;
    for (const auto c : c10::irange(channels)) slopes[c] = static_cast<opmath>(w[shared ? 0 : c]);
  }
  return slopes;
}

// Rows of exactly NV whole steps (e.g. 64 float channels with AVX512): one row per iteration,
// with every lane counter and slope held in registers for the whole run of rows.
template <int NV, typename scalar_t, Activation A>
void narrow_rows(const scalar_t* in, scalar_t* out, int64_t rows, const opmath_t<scalar_t>* slopes, int64_t* mine) {
  using opmath = opmath_t<scalar_t>;
  using C = count_t<scalar_t>;
  constexpr int64_t step = kStep<scalar_t>;
  constexpr int64_t lanes = kPartLanes<scalar_t>;
  constexpr int K = NV * kParts<scalar_t>;
  std::array<Vectorized<C>, K> count;
  std::array<Vectorized<opmath>, K> slope;
  for (int k = 0; k < K; ++k) {
    count[k] = Vectorized<C>(C(0));
    slope[k] = load_slope<A>(slopes + k * lanes);
  }
  for (int64_t row = 0; row < rows; ++row) {
    for (int j = 0; j < NV; ++j) {
      const int64_t off = (row * NV + j) * step;
      auto v = load(in + off, step);
      for (int p = 0; p < kParts<scalar_t>; ++p) {
        count[j * kParts<scalar_t> + p] = add_on(count[j * kParts<scalar_t> + p], v[p]);
        v[p] = activate<A>(v[p], slope[j * kParts<scalar_t> + p]);
      }
      store(out + off, step, v);
    }
  }
  for (int k = 0; k < K; ++k) {
    std::array<C, Vectorized<C>::size()> lane;
    count[k].store(lane.data());
    for (int64_t l = 0; l < lanes; ++l) mine[k * lanes + l] += lane[l];
  }
}

// inner == 1: `outer` rows of `channels` contiguous values (channels_last convs, Linear outputs).
// Vector lanes run along channels, so each lane keeps counting its own channel across rows.
template <typename scalar_t, Activation A>
void rows_kernel(const RectifyPlan& plan, int64_t* partial) {
  using opmath = opmath_t<scalar_t>;
  using C = count_t<scalar_t>;
  constexpr int64_t step = kStep<scalar_t>;
  constexpr int64_t lanes = kPartLanes<scalar_t>;
  const auto [outer, channels, inner] = plan.layout;
  const int64_t padded = (channels + step - 1) / step * step;
  const auto slopes = channel_slopes<scalar_t>(plan, padded);
  const scalar_t* in = plan.input.const_data_ptr<scalar_t>();
  scalar_t* out = plan.output.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, outer, std::max<int64_t>(1, kGrainElements / channels), [&](int64_t begin, int64_t end) {
    int64_t* mine = partial + at::get_thread_num() * channels;
    std::vector<C> acc(padded, C(0));
    auto flush = [&] {
      for (const auto c : c10::irange(channels)) mine[c] += acc[c];
      std::fill(acc.begin(), acc.end(), C(0));
    };
    // One step of channels [c, c + n) at x / y.
    auto one_step = [&](const scalar_t* x, scalar_t* y, int64_t c, int64_t n) {
      auto v = load(x, n);
      for (int p = 0; p < kParts<scalar_t>; ++p) {
        C* a = acc.data() + c + p * lanes;
        add_on(Vectorized<C>::loadu(a), v[p]).store(a);
        v[p] = activate<A>(v[p], load_slope<A>(slopes.data() + c + p * lanes));
      }
      store(y, n, v);
    };
    const int64_t nv = channels % step == 0 ? channels / step : 0;  // whole steps per row, if any
    for (int64_t row0 = begin; row0 < end; row0 += kFlushSteps) {
      const int64_t row1 = std::min(end, row0 + kFlushSteps);
      if (nv == 1 || nv == 2 || nv == 4) {
        auto run = [&](auto NV) {
          narrow_rows<decltype(NV)::value, scalar_t, A>(in + row0 * channels, out + row0 * channels, row1 - row0,
                                                       slopes.data(), mine);
        };
        if (nv == 1) run(std::integral_constant<int, 1>{});
        if (nv == 2) run(std::integral_constant<int, 2>{});
        if (nv == 4) run(std::integral_constant<int, 4>{});
      } else if (nv > 0) {
        // Whole steps per row: walk the rows as one flat run, the channel wrapping around.
        const int64_t first = row0 * channels, last = row1 * channels;
        for (int64_t i = first, c = 0; i < last; i += step) {
          one_step(in + i, out + i, c, step);
          c += step;
          if (c == channels) c = 0;
        }
      } else {
        for (int64_t row = row0; row < row1; ++row) {
          for (int64_t c = 0; c < channels; c += step) {
            one_step(in + row * channels + c, out + row * channels + c, c, std::min(step, channels - c));
          }
        }
      }
      flush();  // at most kFlushSteps rows per lane counter since the last merge
    }
  });
}

// inner > 1: every (outer, channel) pair is one contiguous plane of `inner` values (NCHW convs).
template <typename scalar_t, Activation A>
void planes_kernel(const RectifyPlan& plan, int64_t* partial) {
  using opmath = opmath_t<scalar_t>;
  using C = count_t<scalar_t>;
  constexpr int64_t step = kStep<scalar_t>;
  const auto [outer, channels, inner] = plan.layout;
  const auto slopes = channel_slopes<scalar_t>(plan, channels);
  const scalar_t* in = plan.input.const_data_ptr<scalar_t>();
  scalar_t* out = plan.output.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, outer * channels, std::max<int64_t>(1, kGrainElements / inner), [&](int64_t begin, int64_t end) {
    int64_t* mine = partial + at::get_thread_num() * channels;
    int64_t c = begin % channels;  // advanced with the plane, not recomputed: a division per plane shows
    for (int64_t plane = begin; plane < end; ++plane, c = (c + 1 == channels ? 0 : c + 1)) {
      const Vectorized<opmath> slope(slopes.empty() ? opmath(0) : slopes[c]);
      const scalar_t* x = in + plane * inner;
      scalar_t* y = out + plane * inner;
      for (int64_t chunk = 0; chunk < inner; chunk += kFlushSteps * step) {
        const int64_t chunk_end = std::min(inner, chunk + kFlushSteps * step);
        Vectorized<C> acc(C(0));
        auto one_step = [&](int64_t i, int64_t n) {
          auto v = load(x + i, n);
          for (auto& part : v) {
            acc = add_on(acc, part);
            part = activate<A>(part, slope);
          }
          store(y + i, n, v);
        };
        int64_t i = chunk;
        for (; i + step <= chunk_end; i += step) one_step(i, step);
        if (i < chunk_end) one_step(i, chunk_end - i);
        mine[c] += lane_sum(acc);
      }
    }
  });
}

}  // namespace

void rectify_count_kernel(const RectifyPlan& plan, int64_t* counts) {
  const int64_t channels = plan.layout.channels;
  if (plan.input.numel() == 0) return;
  // One row of counts per thread, merged once at the end: threads never share a counter.
  std::vector<int64_t> partial(static_cast<size_t>(at::get_num_threads()) * channels, 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.input.scalar_type(), "rectify_count_cpu", [&] {
    dispatch_activation(plan.activation, [&](auto act) {
      if (plan.layout.inner == 1) {
        rows_kernel<scalar_t, decltype(act)::value>(plan, partial.data());
      } else {
        planes_kernel<scalar_t, decltype(act)::value>(plan, partial.data());
      }
    });
  });
  for (size_t t = 0; t < partial.size(); t += channels) {
    for (const auto c : c10::irange(channels)) counts[c] += partial[t + c];
  }
}

}  // namespace easier_ext::cpu::CPU_CAPABILITY
