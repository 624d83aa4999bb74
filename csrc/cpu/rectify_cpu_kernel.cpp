// Fused rectifier + per-channel ON counting (and, for rectify_count_entropy, the entropy proxy's
// per-channel sums) on the CPU: one pass, at::vec vectors, at::parallel_for threads, per-thread
// channel counts and sums merged once. Compiled once per CPU capability. The entropy proxy is a
// compile-time flag (E), so rectify_count's loops are the same code as without it.
#include "cpu/rectify_cpu_kernel.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>

#include <array>
#include <cmath>
#include <limits>
#include <vector>

namespace easier_ext::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Enough elements per task that threading pays for itself.
constexpr int64_t kGrainElements = 32768;
// Vector lane counters are 32-bit for float math; merge them into int64 before they could wrap.
constexpr int64_t kFlushSteps = int64_t{1} << 28;
// The entropy proxy's lanes add in float for float/half/bfloat16 inputs: merge them into the
// thread's double sums after at most this many steps (rows kernel: rows), so that no lane's sum
// grows large enough for its rounding to matter. Costs one pass over the channels per merge.
constexpr int64_t kEntropyFlushSteps = 1024;

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
// piecewise-linear ones). `slope` is the per-lane alpha or prelu weight (see has_slope).
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
  } else if constexpr (A == Activation::SiLU) {
    return x / (one + x.neg().exp());
  } else if constexpr (A == Activation::Hardswish) {
    const Vectorized<T> three(T(3));
    const Vectorized<T> six(T(6));
    return x * at::vec::minimum(at::vec::maximum(x + three, zero), six) / six;
  } else if constexpr (A == Activation::ELU) {
    // ELU's `slope` is alpha; x >= 0 keeps -0.0 on the identity side, as torch does.
    return Vectorized<T>::blendv(x.expm1() * slope, x, x >= zero);
  } else {
    static_assert(A == Activation::Mish);
    return x * x.exp().log1p().tanh();
  }
}

// The per-lane slopes at `p` for the activations that have one, zero (unused) for the others.
template <Activation A, typename T>
Vectorized<T> load_slope(const T* p) {
  if constexpr (has_slope(A)) {
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

// The sum of a vector's lanes, in R: int64 for the counts, double for the entropy sums.
template <typename R, typename T>
R lane_sum(const Vectorized<T>& v) {
  std::array<T, Vectorized<T>::size()> lanes;
  v.store(lanes.data());
  R s = 0;
  for (T x : lanes) s += x;
  return s;
}

// The binary entropy, in nats, of p = sigmoid(u), u = x * inv_tau: softplus(u) - p * u, rewritten
// as log1p(e) + a * e / (1 + e) with a = |u| and e = exp(-a). Both terms are >= 0, so neither
// cancels the other (the first form loses every digit once |u| is large), and exp cannot
// overflow. NaN gives NaN; +-inf gives 0 (p is exactly 0 or 1): the clamp of `a` keeps
// 0 * inf out.
template <typename T>
Vectorized<T> entropy_nats(const Vectorized<T>& x, const Vectorized<T>& inv_tau) {
  const Vectorized<T> one(T(1));
  const auto a = (x * inv_tau).abs();
  const auto e = a.neg().exp();
  const auto q = e / (one + e);
  return at::vec::fmadd(q, at::vec::minimum(a, Vectorized<T>(std::numeric_limits<T>::max())), e.log1p());
}

// `v` with only its first `n` lanes kept, 0 in the others: a partial step's loads fill the lanes
// past its values with zeros, which are no elements (and would each add one bit).
template <typename T>
Vectorized<T> first_lanes(const Vectorized<T>& v, int64_t n) {
  const auto keep = Vectorized<T>::arange(T(0), T(1)) < Vectorized<T>(static_cast<T>(n));
  return Vectorized<T>::blendv(Vectorized<T>(T(0)), v, keep);
}

// Per-channel slopes in opmath, padded to whole steps so the rows kernel can load full vectors.
template <typename scalar_t>
std::vector<opmath_t<scalar_t>> channel_slopes(const RectifyPlan& plan, int64_t padded) {
  using opmath = opmath_t<scalar_t>;
  const int64_t channels = plan.layout.channels;
  std::vector<opmath> slopes(padded, opmath(0));
  if (plan.activation == Activation::LeakyReLU || plan.activation == Activation::ELU) {
    std::fill(slopes.begin(), slopes.begin() + channels, static_cast<opmath>(plan.alpha));
  } else if (plan.activation == Activation::PReLU) {
    const scalar_t* w = plan.weight->const_data_ptr<scalar_t>();
    const bool shared = plan.weight->numel() == 1;
    for (const auto c : c10::irange(channels)) slopes[c] = static_cast<opmath>(w[shared ? 0 : c]);
  }
  return slopes;
}

// Independent steps per loop iteration in the planes kernel, each with its own counter, for the
// cheap (piecewise-linear) activations: the loop is then bound by loads and stores, not by one
// counter's add chain. The transcendental ones are bound by their math; unrolling them only spills.
template <Activation A>
constexpr int kUnroll = (A == Activation::GELU || A == Activation::GELUTanh || A == Activation::SiLU ||
                         A == Activation::ELU || A == Activation::Mish)
                            ? 1
                            : 4;

// Steps of channels per block of the rows kernel: 8 counter vectors (and as many slopes) in
// registers; with one block per row, a channels_last conv of 64 float channels on AVX2.
constexpr int kBlockSteps = 8;

// Rows walked per block of channels before the next block: the block's counters stay in registers
// over these rows, and the pass reads a few rows at once. On a 2-core EPYC, 4 rows made the (4096,
// 3072) in-place ReLU 10% faster than torch's own; 1 row is 20% slower (counters through memory),
// 16 or more thrash the prefetchers.
constexpr int64_t kTileRows = 4;

// Activates values at x into y, N == 0 meaning a partial step of n values, and counts the ON ones
// into `count`, one counter vector per part; with E, adds their entropy proxy (nats) into `ent`.
template <int64_t N, bool E, typename scalar_t, Activation A, typename C, typename S>
void step_into(const scalar_t* x, scalar_t* y, int64_t n, C* count, const S* slope, S* ent, const S& inv_tau) {
  const int64_t len = N == 0 ? n : N;
  auto v = load(x, len);
  for (int p = 0; p < kParts<scalar_t>; ++p) {
    count[p] = add_on(count[p], v[p]);
    if constexpr (E) {
      auto h = entropy_nats(v[p], inv_tau);
      if constexpr (N == 0) h = first_lanes(h, n - p * kPartLanes<scalar_t>);
      ent[p] = ent[p] + h;
    }
    v[p] = activate<A>(v[p], slope[p]);
  }
  store(y, len, v);
}

// `rows` rows, `stride` elements apart, of KB steps of channels at in / out (a partial last step of
// `tail` values when Partial). The counters for these channels are acc[0, KB * step) (with E, the
// entropy sums hacc[0, KB * step)): loaded into registers once, kept there over all the rows,
// stored back once.
template <int KB, bool Partial, bool E, typename scalar_t, Activation A>
void block_rows(const scalar_t* in, scalar_t* out, int64_t rows, int64_t stride, int64_t tail,
                const opmath_t<scalar_t>* slopes, count_t<scalar_t>* acc, opmath_t<scalar_t>* hacc,
                const Vectorized<opmath_t<scalar_t>>& inv_tau) {
  using opmath = opmath_t<scalar_t>;
  using C = count_t<scalar_t>;
  constexpr int64_t step = kStep<scalar_t>;
  constexpr int64_t lanes = kPartLanes<scalar_t>;
  constexpr int P = kParts<scalar_t>;
  std::array<Vectorized<C>, KB * P> count;
  std::array<Vectorized<opmath>, KB * P> slope;
  std::array<Vectorized<opmath>, KB * P> ent;  // only read and written with E
  for (int k = 0; k < KB * P; ++k) {
    count[k] = Vectorized<C>::loadu(acc + k * lanes);
    slope[k] = load_slope<A>(slopes + k * lanes);
    if constexpr (E) ent[k] = Vectorized<opmath>::loadu(hacc + k * lanes);
  }
  for (int64_t row = 0; row < rows; ++row) {
    const scalar_t* x = in + row * stride;
    scalar_t* y = out + row * stride;
    for (int j = 0; j < KB; ++j) {
      if (Partial && j == KB - 1) {
        step_into<0, E, scalar_t, A>(x + j * step, y + j * step, tail, &count[j * P], &slope[j * P], &ent[j * P],
                                     inv_tau);
      } else {
        step_into<step, E, scalar_t, A>(x + j * step, y + j * step, step, &count[j * P], &slope[j * P],
                                        &ent[j * P], inv_tau);
      }
    }
  }
  for (int k = 0; k < KB * P; ++k) {
    count[k].store(acc + k * lanes);
    if constexpr (E) ent[k].store(hacc + k * lanes);
  }
}

// inner == 1: `outer` rows of `channels` contiguous values (channels_last convs, Linear outputs).
// Vector lanes run along channels, so each lane keeps counting its own channel down the rows; a row
// is cut into blocks of up to kBlockSteps steps whose counters fit in registers. `partial` and (with
// E) `hpartial` hold one row of C counts / entropy sums per thread.
template <typename scalar_t, Activation A, bool E>
void rows_kernel(const RectifyPlan& plan, int64_t* partial, double* hpartial) {
  using opmath = opmath_t<scalar_t>;
  using C = count_t<scalar_t>;
  constexpr int64_t step = kStep<scalar_t>;
  constexpr int64_t flush_rows = E ? kEntropyFlushSteps : kFlushSteps;
  const auto [outer, channels, inner] = plan.layout;
  const int64_t padded = (channels + step - 1) / step * step;
  const auto slopes = channel_slopes<scalar_t>(plan, padded);
  const Vectorized<opmath> inv_tau(inverse_tau<opmath>(plan));
  const scalar_t* in = plan.input.const_data_ptr<scalar_t>();
  scalar_t* out = plan.output.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, outer, std::max<int64_t>(1, kGrainElements / channels), [&](int64_t begin, int64_t end) {
    int64_t* mine = partial + at::get_thread_num() * channels;
    std::vector<C> acc(padded, C(0));
    std::vector<opmath> hacc(E ? padded : 0, opmath(0));
    // Rows [r, r + rows) of every block of channels.
    auto tile = [&](int64_t r, int64_t rows) {
      const scalar_t* x = in + r * channels;
      scalar_t* y = out + r * channels;
      auto blocks = [&](auto KB, auto partial_step, int64_t c, int64_t tail) {
        block_rows<decltype(KB)::value, decltype(partial_step)::value, E, scalar_t, A>(
            x + c, y + c, rows, channels, tail, slopes.data() + c, acc.data() + c, hacc.data() + c, inv_tau);
      };
      using std::integral_constant;
      int64_t c = 0;
      for (; c + kBlockSteps * step <= channels; c += kBlockSteps * step) {
        blocks(integral_constant<int, kBlockSteps>{}, std::false_type{}, c, 0);
      }
      // What is left, fewer than kBlockSteps steps: blocks of 4, 2 and 1 steps, then a partial one.
      static_assert(kBlockSteps == 8);
      if (c + 4 * step <= channels) {
        blocks(integral_constant<int, 4>{}, std::false_type{}, c, 0);
        c += 4 * step;
      }
      if (c + 2 * step <= channels) {
        blocks(integral_constant<int, 2>{}, std::false_type{}, c, 0);
        c += 2 * step;
      }
      if (c + step <= channels) {
        blocks(integral_constant<int, 1>{}, std::false_type{}, c, 0);
        c += step;
      }
      if (c < channels) blocks(integral_constant<int, 1>{}, std::true_type{}, c, channels - c);
    };

    for (int64_t row0 = begin; row0 < end; row0 += flush_rows) {
      const int64_t row1 = std::min(end, row0 + flush_rows);
      for (int64_t r = row0; r < row1; r += kTileRows) tile(r, std::min(kTileRows, row1 - r));
      // At most flush_rows rows per lane counter since the last merge.
      for (const auto c : c10::irange(channels)) mine[c] += acc[c];
      std::fill(acc.begin(), acc.end(), C(0));
      if constexpr (E) {
        double* mine_h = hpartial + at::get_thread_num() * channels;
        for (const auto c : c10::irange(channels)) mine_h[c] += hacc[c];
        std::fill(hacc.begin(), hacc.end(), opmath(0));
      }
    }
  });
}

// `n` contiguous values of one channel, activated with its slope; returns how many were ON and, with
// E, adds their entropy proxy (nats) to *nats.
template <bool E, typename scalar_t, Activation A>
int64_t plane(const scalar_t* x, scalar_t* y, int64_t n, const Parts<scalar_t>& slope,
              const Vectorized<opmath_t<scalar_t>>& inv_tau, double* nats) {
  using opmath = opmath_t<scalar_t>;
  using C = count_t<scalar_t>;
  constexpr int64_t step = kStep<scalar_t>;
  constexpr int P = kParts<scalar_t>;
  constexpr int U = kUnroll<A>;
  std::array<Vectorized<C>, U * P> count;
  count.fill(Vectorized<C>(C(0)));
  std::array<Vectorized<opmath>, U * P> ent;  // only read and written with E
  if constexpr (E) ent.fill(Vectorized<opmath>(opmath(0)));
  int64_t i = 0;
  for (; i + U * step <= n; i += U * step) {
    for (int u = 0; u < U; ++u) {
      step_into<step, E, scalar_t, A>(x + i + u * step, y + i + u * step, step, &count[u * P], slope.data(),
                                      &ent[u * P], inv_tau);
    }
  }
  for (; i + step <= n; i += step) {
    step_into<step, E, scalar_t, A>(x + i, y + i, step, count.data(), slope.data(), ent.data(), inv_tau);
  }
  if (i < n) step_into<0, E, scalar_t, A>(x + i, y + i, n - i, count.data(), slope.data(), ent.data(), inv_tau);
  for (int k = 1; k < U * P; ++k) count[0] = count[0] + count[k];
  if constexpr (E) {
    for (int k = 1; k < U * P; ++k) ent[0] = ent[0] + ent[k];
    *nats += lane_sum<double>(ent[0]);
  }
  return lane_sum<int64_t>(count[0]);
}

// inner > 1: every (outer, channel) pair is one contiguous plane of `inner` values (NCHW convs).
// `partial` and (with E) `hpartial` hold one row of C counts / entropy sums per thread.
template <typename scalar_t, Activation A, bool E>
void planes_kernel(const RectifyPlan& plan, int64_t* partial, double* hpartial) {
  using opmath = opmath_t<scalar_t>;
  constexpr int64_t step = kStep<scalar_t>;
  constexpr int64_t chunk_steps = E ? kEntropyFlushSteps : kFlushSteps;
  const auto [outer, channels, inner] = plan.layout;
  const auto slopes = channel_slopes<scalar_t>(plan, channels);
  const Vectorized<opmath> inv_tau(inverse_tau<opmath>(plan));
  const scalar_t* in = plan.input.const_data_ptr<scalar_t>();
  scalar_t* out = plan.output.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, outer * channels, std::max<int64_t>(1, kGrainElements / inner), [&](int64_t begin, int64_t end) {
    int64_t* mine = partial + at::get_thread_num() * channels;
    double* mine_h = E ? hpartial + at::get_thread_num() * channels : nullptr;
    int64_t c = begin % channels;  // advanced with the plane, not recomputed: a division per plane shows
    for (int64_t p = begin; p < end; ++p, c = (c + 1 == channels ? 0 : c + 1)) {
      Parts<scalar_t> slope;
      slope.fill(Vectorized<opmath>(slopes.empty() ? opmath(0) : slopes[c]));
      // Chunks of at most chunk_steps steps, so no 32-bit lane counter can wrap (and, with E, no
      // float lane sum grows long).
      for (int64_t chunk = 0; chunk < inner; chunk += chunk_steps * step) {
        const int64_t n = std::min(inner - chunk, chunk_steps * step);
        mine[c] += plane<E, scalar_t, A>(in + p * inner + chunk, out + p * inner + chunk, n, slope, inv_tau,
                                         E ? mine_h + c : nullptr);
      }
    }
  });
}

}  // namespace

void rectify_count_kernel(const RectifyPlan& plan, int64_t* counts, double* entropy) {
  const bool with_entropy = plan.tau.has_value();
  const int64_t channels = plan.layout.channels;
  std::fill(counts, counts + channels, int64_t{0});
  if (with_entropy) std::fill(entropy, entropy + channels, 0.0);
  if (plan.input.numel() == 0) return;
  TORCH_INTERNAL_ASSERT(!with_entropy || entropy != nullptr);
  // One row of counts (and entropy sums) per thread, merged once at the end: threads never share one.
  std::vector<int64_t> partial(static_cast<size_t>(at::get_num_threads()) * channels, 0);
  std::vector<double> hpartial(with_entropy ? partial.size() : 0, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.input.scalar_type(), "rectify_count_cpu", [&] {
    dispatch_activation(plan.activation, [&](auto act) {
      auto run = [&](auto with_entropy) {
        constexpr Activation A = decltype(act)::value;
        constexpr bool E = decltype(with_entropy)::value;
        if (plan.layout.inner == 1) {
          rows_kernel<scalar_t, A, E>(plan, partial.data(), hpartial.data());
        } else {
          planes_kernel<scalar_t, A, E>(plan, partial.data(), hpartial.data());
        }
      };
      // Chosen once per call: the loops of the two variants are separate code.
      if (with_entropy) {
        run(std::true_type{});
      } else {
        run(std::false_type{});
      }
    });
  });
  for (size_t t = 0; t < partial.size(); t += channels) {
    for (const auto c : c10::irange(channels)) counts[c] += partial[t + c];
  }
  if (with_entropy) {
    for (size_t t = 0; t < hpartial.size(); t += channels) {
      for (const auto c : c10::irange(channels)) entropy[c] += hpartial[t + c];
    }
    for (const auto c : c10::irange(channels)) entropy[c] *= M_LOG2E;  // nats to bits
  }
}

}  // namespace easier_ext::cpu::CPU_CAPABILITY
