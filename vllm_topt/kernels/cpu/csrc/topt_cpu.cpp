// Top-θ decode attention over vLLM's CPU paged KV cache (one query per sequence).
//
// Work is split into tasks of (sequence, KV head, chunk of blocks) so that a
// single long sequence still fills every core. Three phases, in one parallel
// region with no barrier between them (see `run`):
//   A. scores: read each chunk's K blocks in full, compute the G query heads'
//      scaled scores, and the chunk's row max and exp-sum (online softmax);
//   combine: global max M and sum S per head; the threshold becomes a bound on
//      the score itself (post-softmax: p > θ  <=>  s > M + ln(θ S)), so the
//      keep decision is one compare and exp() runs only in blocks that are read;
//   B. values: per V block, the rows kept by any head of the group (GQA union)
//      are read, row by row (a dropped row costs no memory traffic on a CPU);
//      VMC adds the chunk's per-block V sums (block-wise VMC: each block's sum
//      weighted by the mass its dropped rows carried, from phase A's per-block
//      log-sum-exp where no row of the block was read);
//   C. per head: sum the chunks, apply the SPEC §4 denominator and VMC.
// Semantics: vllm_topt/method/reference.py (SPEC §2-5). Registered as the torch
// op torch.ops.vllm_topt.topt_decode (schema at the end of this file).
//
// Layout (vLLM CPU_ATTN, ISA "vec"): a K block is stored transposed,
// [head_size][block_size]; a V block row-major, [block_size][head_size].

#include <torch/all.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <omp.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// The codes are vllm_topt.method.rules' enums, passed by the build
// (vllm_topt/kernels/cpu/cpp.py) as -D flags: one definition, in Python.
#if !defined(TOPT_PLACEMENT_POST_SOFTMAX) || !defined(TOPT_PLACEMENT_PRE_SOFTMAX) || !defined(TOPT_SDC_NONE) || \
    !defined(TOPT_SDC_EXACT) || !defined(TOPT_SDC_EXP_THRESHOLD) || !defined(TOPT_MAX_BLOCK_SIZE) ||         \
    !defined(TOPT_VMC_SCOPE_SEQUENCE) || !defined(TOPT_VMC_SCOPE_BLOCK)
#error "build through vllm_topt.kernels.cpu.cpp, which passes the placement and SDC codes"
#endif
enum Placement : int64_t { kPostSoftmax = TOPT_PLACEMENT_POST_SOFTMAX, kPreSoftmax = TOPT_PLACEMENT_PRE_SOFTMAX };
enum Sdc : int64_t { kSdcNone = TOPT_SDC_NONE, kSdcExact = TOPT_SDC_EXACT, kSdcExpThreshold = TOPT_SDC_EXP_THRESHOLD };
enum VmcScope : int64_t { kVmcSequence = TOPT_VMC_SCOPE_SEQUENCE, kVmcBlock = TOPT_VMC_SCOPE_BLOCK };

// Counts per (sequence, KV head): kept elements, V rows read, V blocks read,
// kept elements in thresholded rows.
constexpr int kNumCounts = 4;
constexpr int64_t kMaxBlockSize = TOPT_MAX_BLOCK_SIZE;  // MAX_BLOCK_SIZE in cpp.py
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// Where a call's time goes (benchmarks/profile_cpu.py). Only the profile build
// (-DTOPT_PROFILE_PHASES, cpp.py under VLLM_TOPT_CPU_PROFILE=1) times anything:
// each scope marked TOPT_PHASE adds its nanoseconds, summed over threads, to its
// phase; "call" is the calling thread's wall time from entry to return.
#define TOPT_PHASES(X) X(call) X(entry) X(scores) X(softmax) X(combine) X(wait) X(select) X(gather) \
  X(compensation) X(finish) X(exit)
#define TOPT_PHASE_ENUM(name) kPhase_##name,
#define TOPT_PHASE_NAME(name) #name,
enum Phase : int { TOPT_PHASES(TOPT_PHASE_ENUM) kNumPhases };
constexpr const char* kPhaseNames[] = {TOPT_PHASES(TOPT_PHASE_NAME)};
std::atomic<int64_t> g_phase_ns[kNumPhases];
std::atomic<int64_t> g_profiled_calls{0};

#ifdef TOPT_PROFILE_PHASES
class PhaseTimer {
 public:
  explicit PhaseTimer(Phase phase) : phase_(phase), start_(Clock::now()) {}
  ~PhaseTimer() {
    g_phase_ns[phase_].fetch_add(std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start_).count(),
                                 std::memory_order_relaxed);
  }

 private:
  Phase phase_;
  Clock::time_point start_;
};
#define TOPT_PHASE_CAT(a, b) a##b
#define TOPT_PHASE_VAR(line) TOPT_PHASE_CAT(topt_phase_timer_, line)
#define TOPT_PHASE(name) PhaseTimer TOPT_PHASE_VAR(__LINE__)(kPhase_##name)
// entry and exit span two functions: the calling thread's last mark (the call's
// start, then the parallel region's end) ends them.
thread_local Clock::time_point t_phase_mark;
#define TOPT_PHASE_MARK() (t_phase_mark = Clock::now())
#define TOPT_PHASE_SINCE_MARK(name)                                                                              \
  g_phase_ns[kPhase_##name].fetch_add(                                                                          \
      std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t_phase_mark).count(),                \
      std::memory_order_relaxed)
#else
#define TOPT_PHASE(name) ((void)0)
#define TOPT_PHASE_MARK() ((void)0)
#define TOPT_PHASE_SINCE_MARK(name) ((void)0)
#endif

// One step of a spin-wait. Never sched_yield(): with another process on the
// core, the kernel hands that process the core for its whole time slice
// (milliseconds, against a ~0.1 ms layer call), which made a busy machine cost
// TOPT 5-30x (docs/cpu_contention.md).
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// exp_nonpositive's constants, one definition for its scalar, AVX2 and AVX-512 forms.
constexpr float kExpMin = -87.0f, kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693145751953125f, kLn2Lo = 1.428606765330187e-06f;  // ln 2 = hi + lo
constexpr float kExpC6 = 1.0f / 720.0f, kExpC5 = 1.0f / 120.0f, kExpC4 = 1.0f / 24.0f, kExpC3 = 1.0f / 6.0f;

// exp(x) for x <= 0 (scores minus the row max), written so GCC vectorises it:
// exp(x) = 2^k * exp(r), r = x - k ln2 in [-ln2/2, ln2/2], degree-6 Taylor
// polynomial (relative error < 2e-7). Inputs below -87 give ~1e-38, not 0.
inline float exp_nonpositive(float x) {
  x = x < kExpMin ? kExpMin : x;
  const float k = std::floor(x * kLog2e + 0.5f);
  const float r = x - k * kLn2Hi - k * kLn2Lo;
  float p = kExpC6;
  p = p * r + kExpC5;
  p = p * r + kExpC4;
  p = p * r + kExpC3;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

#if defined(__AVX2__) && defined(__FMA__)
// exp_nonpositive on 8 lanes (same polynomial, same results up to rounding).
inline __m256 exp8_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(kExpMin));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpC6);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC5));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

#if defined(__AVX512F__)
// exp_nonpositive on 16 lanes (same polynomial).
inline __m512 exp16_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(kExpMin));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpC6);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC5));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}
#endif

inline float hsum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

inline float hmax8(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}
#endif

// max of s[0..n)
inline float row_max(const float* s, int64_t n) {
  float mx = kNegInf;
  int64_t t = 0;
#if defined(__AVX512F__)
  if (n >= 16) {
    __m512 m = _mm512_loadu_ps(s);
    for (t = 16; t + 16 <= n; t += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + t));
    mx = _mm512_reduce_max_ps(m);
  }
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if (n - t >= 8) {
    __m256 m = _mm256_loadu_ps(s + t);
    for (t += 8; t + 8 <= n; t += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + t));
    mx = std::max(mx, hmax8(m));
  }
#endif
  for (; t < n; ++t) mx = std::max(mx, s[t]);
  return mx;
}

// Σ exp(s[t] - m) over t < n (every s[t] <= m)
inline float exp_sum(const float* s, int64_t n, float m) {
  float sum = 0.f;
  int64_t t = 0;
#if defined(__AVX512F__)
  const __m512 mv16 = _mm512_set1_ps(m);
  __m512 acc16 = _mm512_setzero_ps();
  for (; t + 16 <= n; t += 16)
    acc16 = _mm512_add_ps(acc16, exp16_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + t), mv16)));
  sum = _mm512_reduce_add_ps(acc16);
#endif
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  for (; t + 8 <= n; t += 8) acc = _mm256_add_ps(acc, exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + t), mv)));
  sum += hsum8(acc);
#endif
  for (; t < n; ++t) sum += exp_nonpositive(s[t] - m);
  return sum;
}

struct KeptWeights {
  int64_t kept;
  float kept_sum;  // Σ exp(s - m) over the kept elements
};

// w[t] = s[t] > bound ? exp(s[t] - m) : 0 for t < n. exp runs only where a
// lane is kept: most lanes of a read page are dropped (a page is read for one
// kept row of one head), and short rows, whose pages are nearly all read, are
// bound by this arithmetic rather than by memory.
inline KeptWeights kept_weights(const float* s, float* w, int64_t n, float bound, float m) {
  int64_t kept = 0;
  float sum = 0.f;
  int64_t t = 0;
#if defined(__AVX512F__)
  const __m512 mv16 = _mm512_set1_ps(m), bv16 = _mm512_set1_ps(bound);
  __m512 acc16 = _mm512_setzero_ps();
  for (; t + 16 <= n; t += 16) {
    const __m512 x = _mm512_loadu_ps(s + t);
    const __mmask16 keep = _mm512_cmp_ps_mask(x, bv16, _CMP_GT_OQ);
    if (keep == 0) {
      _mm512_storeu_ps(w + t, _mm512_setzero_ps());
      continue;
    }
    const __m512 e = _mm512_maskz_mov_ps(keep, exp16_nonpositive(_mm512_sub_ps(x, mv16)));
    _mm512_storeu_ps(w + t, e);
    acc16 = _mm512_add_ps(acc16, e);
    kept += __builtin_popcount(keep);
  }
  sum = _mm512_reduce_add_ps(acc16);
#endif
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 mv = _mm256_set1_ps(m), bv = _mm256_set1_ps(bound);
  __m256 acc = _mm256_setzero_ps();
  for (; t + 8 <= n; t += 8) {
    const __m256 x = _mm256_loadu_ps(s + t);
    const __m256 keep = _mm256_cmp_ps(x, bv, _CMP_GT_OQ);
    const int keep_bits = _mm256_movemask_ps(keep);
    if (keep_bits == 0) {
      _mm256_storeu_ps(w + t, _mm256_setzero_ps());
      continue;
    }
    const __m256 e = _mm256_and_ps(keep, exp8_nonpositive(_mm256_sub_ps(x, mv)));
    _mm256_storeu_ps(w + t, e);
    acc = _mm256_add_ps(acc, e);
    kept += __builtin_popcount(keep_bits);
  }
  sum += hsum8(acc);
#endif
  for (; t < n; ++t) {
    const bool keep = s[t] > bound;
    w[t] = keep ? exp_nonpositive(s[t] - m) : 0.f;
    kept += keep;
    sum += w[t];
  }
  return {kept, sum};
}

// Scores of G query heads against one K block stored [d][BS]:
// s[g * s_stride + t] receives q_g . k_t. The first pass over the block also
// prefetches `next` (the next K block, or null) into L2: blocks sit at
// scattered addresses, so the hardware prefetcher cannot run ahead of the
// block table, and one core's K stream is otherwise bound by its miss latency
// (into L1, the two blocks did not fit beside each other: 2 x 32 KiB).
// AVX2 (no AVX-512): heads in pairs and keys in 32-wide strips, so 2 x 4
// accumulators of 8 lanes stay in registers across the d-loop; the block (in
// L1) is re-read once per pair. The profile (benchmarks/profile_cpu.py) found
// this loop at 80% of the kernel's time on a Zen 5 core, at 40% of its read
// bandwidth: it was bound by instructions, not by memory.
#if defined(__AVX512F__)
// AVX-512: HG heads against the Z * 16 keys of a strip, HG x Z accumulators (at
// most 24 of the 32 registers) across the d-loop. A whole 128-key row of the
// block is one strip, so the block streams row after row (512 contiguous bytes
// per dim); the first head group also prefetches the same row of `next` into L2.
template <int BS, int Z, int HG>
inline void strip_scores_512(const float* q, int64_t d, const float* kb, float* s, int64_t s_stride,
                             const float* next) {
  __m512 acc[HG][Z];
  for (int h = 0; h < HG; ++h)
    for (int z = 0; z < Z; ++z) acc[h][z] = _mm512_setzero_ps();
  for (int64_t c = 0; c < d; ++c) {
    const float* krow = kb + c * BS;
    if (next != nullptr) {
      for (int z = 0; z < Z; ++z) _mm_prefetch(reinterpret_cast<const char*>(next + c * BS + 16 * z), _MM_HINT_T1);
    }
    __m512 x[HG];
    for (int h = 0; h < HG; ++h) x[h] = _mm512_set1_ps(q[h * d + c]);
    for (int z = 0; z < Z; ++z) {
      const __m512 k = _mm512_loadu_ps(krow + 16 * z);
      for (int h = 0; h < HG; ++h) acc[h][z] = _mm512_fmadd_ps(x[h], k, acc[h][z]);
    }
  }
  for (int h = 0; h < HG; ++h)
    for (int z = 0; z < Z; ++z) _mm512_storeu_ps(s + h * s_stride + 16 * z, acc[h][z]);
}
#endif

template <typename T, int BS>
void block_scores(const float* q, const T* kb, float* s, int64_t G, int64_t d, int64_t s_stride, const T* next) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float> && BS % 16 == 0) {
    constexpr int kStrip = BS < 128 ? BS : 128;  // keys per strip: 8 registers at most
    constexpr int Z = kStrip / 16;
    for (int t0 = 0; t0 < BS; t0 += kStrip) {
      const float* next_strip = next != nullptr ? next + t0 : nullptr;
      int64_t g = 0;
      for (; g + 3 <= G; g += 3, next_strip = nullptr)
        strip_scores_512<BS, Z, 3>(q + g * d, d, kb + t0, s + g * s_stride + t0, s_stride, next_strip);
      if (G - g == 2) strip_scores_512<BS, Z, 2>(q + g * d, d, kb + t0, s + g * s_stride + t0, s_stride, next_strip);
      if (G - g == 1) strip_scores_512<BS, Z, 1>(q + g * d, d, kb + t0, s + g * s_stride + t0, s_stride, next_strip);
    }
    return;
  }
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<T, float> && BS % 32 == 0) {
    for (int t0 = 0; t0 < BS; t0 += 32) {
      if (next != nullptr) {
        for (int64_t c = 0; c < d; ++c) {
          const float* p = next + c * BS + t0;
          _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1);
          _mm_prefetch(reinterpret_cast<const char*>(p + 16), _MM_HINT_T1);
        }
      }
      int64_t g = 0;
      for (; g + 1 < G; g += 2) {
        const float* q0 = q + g * d;
        const float* q1 = q0 + d;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (int64_t c = 0; c < d; ++c) {
          const float* krow = kb + c * BS + t0;  // row c of the transposed block: dim c of the keys
          const __m256 k0 = _mm256_loadu_ps(krow), k1 = _mm256_loadu_ps(krow + 8);
          const __m256 k2 = _mm256_loadu_ps(krow + 16), k3 = _mm256_loadu_ps(krow + 24);
          const __m256 x = _mm256_broadcast_ss(q0 + c), y = _mm256_broadcast_ss(q1 + c);
          a0 = _mm256_fmadd_ps(x, k0, a0);
          a1 = _mm256_fmadd_ps(x, k1, a1);
          a2 = _mm256_fmadd_ps(x, k2, a2);
          a3 = _mm256_fmadd_ps(x, k3, a3);
          b0 = _mm256_fmadd_ps(y, k0, b0);
          b1 = _mm256_fmadd_ps(y, k1, b1);
          b2 = _mm256_fmadd_ps(y, k2, b2);
          b3 = _mm256_fmadd_ps(y, k3, b3);
        }
        float* s0 = s + g * s_stride + t0;
        float* s1 = s0 + s_stride;
        _mm256_storeu_ps(s0, a0), _mm256_storeu_ps(s0 + 8, a1), _mm256_storeu_ps(s0 + 16, a2);
        _mm256_storeu_ps(s0 + 24, a3);
        _mm256_storeu_ps(s1, b0), _mm256_storeu_ps(s1 + 8, b1), _mm256_storeu_ps(s1 + 16, b2);
        _mm256_storeu_ps(s1 + 24, b3);
      }
      if (g < G) {
        const float* q0 = q + g * d;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t c = 0; c < d; ++c) {
          const float* krow = kb + c * BS + t0;
          const __m256 x = _mm256_broadcast_ss(q0 + c);
          a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(krow), a0);
          a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(krow + 8), a1);
          a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(krow + 16), a2);
          a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(krow + 24), a3);
        }
        float* s0 = s + g * s_stride + t0;
        _mm256_storeu_ps(s0, a0), _mm256_storeu_ps(s0 + 8, a1), _mm256_storeu_ps(s0 + 16, a2);
        _mm256_storeu_ps(s0 + 24, a3);
      }
    }
    return;
  }
#endif
  for (int64_t g = 0; g < G; ++g) {
    float acc[BS] = {};
    const float* q0 = q + g * d;
    for (int64_t c = 0; c < d; ++c) {
      const T* krow = kb + c * BS;
      const float a = q0[c];
      for (int t = 0; t < BS; ++t) acc[t] += a * to_float(krow[t]);
    }
    std::memcpy(s + g * s_stride, acc, sizeof(acc));
  }
}

template <typename T>
void block_scores_any(const float* q, const T* kb, float* s, int64_t G, int64_t d, int64_t bs, int64_t s_stride) {
  for (int64_t g = 0; g < G; ++g) {
    float* acc = s + g * s_stride;
    for (int64_t t = 0; t < bs; ++t) acc[t] = 0.f;
    for (int64_t c = 0; c < d; ++c) {
      const float qc = q[g * d + c];
      for (int64_t t = 0; t < bs; ++t) acc[t] += qc * to_float(kb[c * bs + t]);
    }
  }
}

template <typename T>
struct Problem {
  // Inputs.
  const float* query;  // [B, H, d]
  const T* key_cache;
  const T* value_cache;
  const int32_t* block_table;
  const int32_t* seq_lens;
  const float* theta;  // [B, H], or [N, H] indexed by row length (theta_by_length), or null
  bool theta_by_length;
  const bool* sparse;  // [B]: the threshold applies to this row
  const float* v_block_sums;  // [num_blocks, H_kv, d] or null
  int64_t table_stride, cache_block_stride, cache_head_stride, sums_block_stride;
  int64_t B, H, Hkv, G, d, bs;
  int64_t placement, sdc;
  bool vmc;
  int64_t vmc_scope;
  float scale, soft_cap;
  // Scratch and outputs.
  float* scores;  // per (b, h): [G][nb * bs] at score_offset(b, h)
  float* block_lse;  // block-wise VMC: per (b, h): [G][nb], ln Σ_{t in block} exp(s_t); else null
  const int64_t* seq_block_offset;  // [B + 1]: prefix sums of blocks per sequence
  float* out;  // [B, H, d]
  int64_t* counts;  // [B, H_kv, kNumCounts]

  int64_t num_blocks(int64_t b) const { return seq_block_offset[b + 1] - seq_block_offset[b]; }
  float* score_row(int64_t b, int64_t h, int64_t g) const {
    const int64_t nbbs = num_blocks(b) * bs;
    return scores + (seq_block_offset[b] * bs * Hkv + h * nbbs) * G + g * nbbs;
  }
  float* lse_row(int64_t b, int64_t h, int64_t g) const {
    const int64_t nb = num_blocks(b);
    return block_lse + (seq_block_offset[b] * Hkv + h * nb) * G + g * nb;
  }
  bool thresholded(int64_t b) const { return sparse[b]; }
  bool block_vmc(int64_t b) const { return vmc && vmc_scope == kVmcBlock && sparse[b]; }
  float threshold(int64_t b, int64_t head) const {
    return theta[(theta_by_length ? seq_lens[b] : b) * H + head];
  }
};

struct Task {
  int64_t b, h, blk_begin, blk_end;
};

// Per task, per head of the group: what phase A and B leave for the combine.
struct Partial {
  float max, exp_sum;  // phase A
  float kept_exp_sum;  // phase B: Σ exp(s - M) over kept elements
  float dropped_exp_sum;  // phase B, block-wise VMC: Σ exp(s - M) over dropped elements
  int64_t kept;
};

// Phase A: scores of one chunk, with the chunk's max and Σ exp(s - max) per head.
template <typename T>
void score_chunk(const Problem<T>& P, const Task& task, Partial* part) {
  const int64_t n = P.seq_lens[task.b];
  const int32_t* table = P.block_table + task.b * P.table_stride;
  // The group's queries times the softmax scale, so the scores come out scaled.
  std::vector<float> q_scaled(P.G * P.d);
  const float* q_in = P.query + (task.b * P.H + task.h * P.G) * P.d;
  for (int64_t i = 0; i < P.G * P.d; ++i) q_scaled[i] = q_in[i] * P.scale;
  const float* q = q_scaled.data();
  float* s0 = P.score_row(task.b, task.h, 0);
  const int64_t stride = P.num_blocks(task.b) * P.bs;
  for (int64_t g = 0; g < P.G; ++g) part[g].max = kNegInf, part[g].exp_sum = 0.f;
  for (int64_t blk = task.blk_begin; blk < task.blk_end; ++blk) {
    const T* kb = P.key_cache + table[blk] * P.cache_block_stride + task.h * P.cache_head_stride;
    const T* next = blk + 1 < task.blk_end
                        ? P.key_cache + table[blk + 1] * P.cache_block_stride + task.h * P.cache_head_stride
                        : nullptr;
    float* sb = s0 + blk * P.bs;
    {
      TOPT_PHASE(scores);
      switch (P.bs) {
        case 32: block_scores<T, 32>(q, kb, sb, P.G, P.d, stride, next); break;
        case 64: block_scores<T, 64>(q, kb, sb, P.G, P.d, stride, next); break;
        case 128: block_scores<T, 128>(q, kb, sb, P.G, P.d, stride, next); break;
        default: block_scores_any<T>(q, kb, sb, P.G, P.d, P.bs, stride);
      }
    }
    // Online softmax over the chunk while the block's scores are still in L1.
    TOPT_PHASE(softmax);
    const int64_t rows = std::min(P.bs, n - blk * P.bs);
    for (int64_t g = 0; g < P.G; ++g) {
      float* sg = sb + g * stride;
      if (P.soft_cap > 0) {
        for (int64_t t = 0; t < rows; ++t) sg[t] = P.soft_cap * std::tanh(sg[t] / P.soft_cap);
      }
      const float bmax = row_max(sg, rows);
      float& mx = part[g].max;
      float& sum = part[g].exp_sum;
      if (bmax > mx) {
        sum = mx == kNegInf ? 0.f : sum * std::exp(mx - bmax);
        mx = bmax;
      }
      if (P.block_vmc(task.b)) {
        const float block_sum = exp_sum(sg, rows, bmax);
        P.lse_row(task.b, task.h, g)[blk] = bmax + std::log(block_sum);
        sum += block_sum * std::exp(bmax - mx);
      } else {
        sum += exp_sum(sg, rows, mx);
      }
    }
  }
}

// Per head: the global max and sum, and the keep bound on the score.
struct HeadState {
  float max, sum, bound;  // keep element j  <=>  s_j > bound
};

template <typename T>
HeadState combine_head(const Problem<T>& P, int64_t b, int64_t h, int64_t g, const Partial* parts,
                       int64_t num_parts, int64_t part_stride) {
  float mx = kNegInf;
  for (int64_t i = 0; i < num_parts; ++i) mx = std::max(mx, parts[i * part_stride + g].max);
  float sum = 0.f;
  for (int64_t i = 0; i < num_parts; ++i) {
    const Partial& p = parts[i * part_stride + g];
    sum += p.exp_sum * std::exp(p.max - mx);
  }
  float bound = kNegInf;  // dense rows keep every element
  if (P.thresholded(b)) {
    const float th = P.threshold(b, h * P.G + g);
    if (P.placement == kPreSoftmax) bound = th;
    else if (th > 0.f) bound = mx + std::log(th * sum);  // p > θ  <=>  s > M + ln(θ S)
  }
  return {mx, sum, bound};
}

// o[g] += Σ_i w[g][rows[i]] v[rows[i]] over the listed rows of one V block
// (row-major [bs][d]); only those rows are read. For float caches each head's
// 64-wide output strip stays in registers while the rows stream from L1.
template <typename T>
void accumulate_rows(const T* vb, const int32_t* rows, int64_t num_rows, const float* w, int64_t bs, float* o,
                     int64_t G, int64_t d) {
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<T, float>) {
    if (d % 64 == 0) {
      for (int64_t c0 = 0; c0 < d; c0 += 64) {
        for (int64_t g = 0; g < G; ++g) {
          float* og = o + g * d + c0;
          __m256 a[8];
          for (int i = 0; i < 8; ++i) a[i] = _mm256_loadu_ps(og + 8 * i);
          const float* wg = w + g * bs;
          for (int64_t i = 0; i < num_rows; ++i) {
            const float* v = vb + rows[i] * d + c0;
            const __m256 x = _mm256_set1_ps(wg[rows[i]]);
            for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(x, _mm256_loadu_ps(v + 8 * j), a[j]);
          }
          for (int i = 0; i < 8; ++i) _mm256_storeu_ps(og + 8 * i, a[i]);
        }
      }
      return;
    }
  }
#endif
  for (int64_t i = 0; i < num_rows; ++i) {
    const T* v = vb + rows[i] * d;
    for (int64_t g = 0; g < G; ++g) {
      const float wt = w[g * bs + rows[i]];
      float* og = o + g * d;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) og[c] += wt * to_float(v[c]);
    }
  }
}

// VMC's sums of one V block into the chunk's mean_sum (see value_chunk): block
// scope adds dropped[g] / rows x the block's V sum per head, sequence scope the sum.
inline void add_block_sums(const float* block_sum, const float* dropped, float inv_rows, bool block_vmc, int64_t G,
                           int64_t d, float* mean_sum) {
  if (!block_vmc) {
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) mean_sum[c] += block_sum[c];
    return;
  }
  for (int64_t g = 0; g < G; ++g) {
    const float w = dropped[g] * inv_rows;
    float* mg = mean_sum + g * d;
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) mg[c] += w * block_sum[c];
  }
}

// Phase B: Σ_j exp(s_j - M) v_j over the kept elements of one chunk, reading
// only V rows kept by some head of the group. o: [G][d] partial output;
// mean_sum: VMC's V sums, [d] Σ of the chunk's block V sums (sequence scope) or
// [G][d] Σ_b (dropped exp-sum of block b) · mean(V of b) per head (block scope),
// added block by block (the sums sit at scattered addresses: the next block's
// are prefetched while this one's rows are read).
template <typename T>
void value_chunk(const Problem<T>& P, const Task& task, const HeadState* heads, Partial* part, float* o,
                 float* mean_sum, int64_t* rows_read, int64_t* blocks_read) {
  const int64_t n = P.seq_lens[task.b], G = P.G, d = P.d, bs = P.bs;
  const int32_t* table = P.block_table + task.b * P.table_stride;
  const float* s0 = P.score_row(task.b, task.h, 0);
  const int64_t stride = P.num_blocks(task.b) * bs;
  const bool block_vmc = P.block_vmc(task.b);
  const bool vmc = P.vmc && P.thresholded(task.b);
  std::fill(o, o + G * d, 0.f);
  if (vmc) std::fill(mean_sum, mean_sum + (block_vmc ? G * d : d), 0.f);
  for (int64_t g = 0; g < G; ++g) part[g].kept_exp_sum = 0.f, part[g].dropped_exp_sum = 0.f, part[g].kept = 0;
  uint8_t need[kMaxBlockSize];
  int32_t row_ids[kMaxBlockSize];
  std::vector<float> weights(G * bs), dropped(G);  // dropped: block-wise VMC, per head, Σ exp(s - M) dropped
  auto block_sum = [&](int64_t blk) { return P.v_block_sums + table[blk] * P.sums_block_stride + task.h * d; };
  for (int64_t blk = task.blk_begin; blk < task.blk_end; ++blk) {
    const int64_t j0 = blk * bs, rows = std::min(bs, n - j0);
    if (vmc && blk + 1 < task.blk_end) {
      for (int64_t c = 0; c < d; c += 16) __builtin_prefetch(block_sum(blk + 1) + c);
    }
    int64_t num_rows = 0;
    {
      TOPT_PHASE(select);
      std::fill(need, need + rows, 0);
      for (int64_t g = 0; g < G; ++g) {
        const float* sg = s0 + g * stride + j0;
        const float bound = heads[g].bound;
        for (int64_t t = 0; t < rows; ++t) need[t] |= sg[t] > bound;
      }
      for (int64_t t = 0; t < rows; ++t) row_ids[num_rows] = static_cast<int32_t>(t), num_rows += need[t];
      if (num_rows == 0) {  // the whole V page stays unread; every head dropped all of its mass
        for (int64_t g = 0; block_vmc && g < G; ++g)
          dropped[g] = std::exp(P.lse_row(task.b, task.h, g)[blk] - heads[g].max);
      } else {
        *rows_read += num_rows;
        *blocks_read += 1;
        for (int64_t g = 0; g < G; ++g) {
          const float* sg = s0 + g * stride + j0;
          const KeptWeights kw = kept_weights(sg, weights.data() + g * bs, rows, heads[g].bound, heads[g].max);
          part[g].kept += kw.kept;
          part[g].kept_exp_sum += kw.kept_sum;
          // What the page's heads dropped: its whole exp-sum (phase A) less what they kept.
          if (block_vmc)
            dropped[g] = std::max(0.f, std::exp(P.lse_row(task.b, task.h, g)[blk] - heads[g].max) - kw.kept_sum);
        }
      }
    }
    if (vmc) {
      TOPT_PHASE(compensation);
      for (int64_t g = 0; block_vmc && g < G; ++g) part[g].dropped_exp_sum += dropped[g];
      add_block_sums(block_sum(blk), dropped.data(), 1.f / static_cast<float>(rows), block_vmc, G, d, mean_sum);
    }
    if (num_rows == 0) continue;
    TOPT_PHASE(gather);
    const T* vb = P.value_cache + table[blk] * P.cache_block_stride + task.h * P.cache_head_stride;
    accumulate_rows(vb, row_ids, num_rows, weights.data(), bs, o, G, d);
  }
}

// Chunks small enough to give every thread several tasks, large enough to
// amortise the per-task work.
std::vector<Task> make_tasks(const int64_t* seq_block_offset, int64_t B, int64_t Hkv, int threads,
                             std::vector<int64_t>& first_task) {
  const int64_t total = seq_block_offset[B] * Hkv;
  const int64_t target_tasks = 4 * static_cast<int64_t>(threads);
  const int64_t chunk = std::clamp<int64_t>((total + target_tasks - 1) / target_tasks, 4, 128);
  std::vector<Task> tasks;
  first_task.assign(B * Hkv + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t nb = seq_block_offset[b + 1] - seq_block_offset[b];
    for (int64_t h = 0; h < Hkv; ++h) {
      first_task[b * Hkv + h] = static_cast<int64_t>(tasks.size());
      for (int64_t blk = 0; blk < nb; blk += chunk) tasks.push_back({b, h, blk, std::min(nb, blk + chunk)});
    }
  }
  first_task[B * Hkv] = static_cast<int64_t>(tasks.size());
  return tasks;
}

// Block-wise VMC's mean for head g: Σ_b d_b mean_b / Σ_b d_b (SPEC §4) over the
// chunks' [G][d] sums and dropped exp-sums; zero when nothing was dropped.
inline void block_mean(const float* partial_mean, const Partial* parts, int64_t t0, int64_t t1, int64_t g,
                       int64_t G, int64_t d, float* mean) {
  float dropped = 0.f;
  std::fill(mean, mean + d, 0.f);
  for (int64_t i = t0; i < t1; ++i) {
    dropped += parts[i * G + g].dropped_exp_sum;
    const float* pm = partial_mean + (i * G + g) * d;
    for (int64_t c = 0; c < d; ++c) mean[c] += pm[c];
  }
  if (dropped <= 0.f) return std::fill(mean, mean + d, 0.f);
  const float inv = 1.f / dropped;
  for (int64_t c = 0; c < d; ++c) mean[c] *= inv;
}

// Phase C for one (sequence, KV head): sum the chunks, normalise (SPEC §4), VMC, counts.
template <typename T>
void finish_group(const Problem<T>& P, int64_t bh, int64_t t0, int64_t t1, const HeadState* heads,
                  const Partial* parts, const float* partial_out, const float* partial_mean,
                  const int64_t* rows_read, const int64_t* blocks_read) {
  const int64_t G = P.G, d = P.d;
  const int64_t b = bh / P.Hkv, h = bh % P.Hkv;
  const int64_t n = P.seq_lens[b];
  const bool thresholded = P.thresholded(b);
  const bool block_vmc = P.block_vmc(b);
  std::vector<float> acc(d), mean(d, 0.f);
  int64_t kept_all = 0, rows = 0, blocks = 0;
  for (int64_t i = t0; i < t1; ++i) rows += rows_read[i], blocks += blocks_read[i];
  if (P.vmc && thresholded && !block_vmc) {
    for (int64_t i = t0; i < t1; ++i)
      for (int64_t c = 0; c < d; ++c) mean[c] += partial_mean[i * d + c];
    for (int64_t c = 0; c < d; ++c) mean[c] /= static_cast<float>(n);
  }
  for (int64_t g = 0; g < G; ++g) {
    const HeadState& hs = heads[bh * G + g];
    std::fill(acc.begin(), acc.end(), 0.f);
    float kept_exp = 0.f;
    int64_t kept = 0;
    for (int64_t i = t0; i < t1; ++i) {
      kept_exp += parts[i * G + g].kept_exp_sum;
      kept += parts[i * G + g].kept;
      const float* po = &partial_out[(i * G + g) * d];
      for (int64_t c = 0; c < d; ++c) acc[c] += po[c];
    }
    float denom = hs.sum;  // dense and post-softmax: kept elements keep their dense p
    if (thresholded && P.placement == kPreSoftmax) {
      float dropped_mass = 0.f;
      if (P.sdc == kSdcExact) dropped_mass = hs.sum - kept_exp;
      else if (P.sdc == kSdcExpThreshold)
        dropped_mass = static_cast<float>(n - kept) * std::exp(P.threshold(b, h * G + g) - hs.max);
      denom = std::max(kept_exp + dropped_mass, std::numeric_limits<float>::min());
    }
    const float inv = 1.f / denom;
    float* og = P.out + (b * P.H + h * G + g) * d;
    const float rest = (P.vmc && thresholded) ? 1.f - kept_exp * inv : 0.f;
    if (block_vmc) block_mean(partial_mean, parts, t0, t1, g, G, d, mean.data());
    for (int64_t c = 0; c < d; ++c) og[c] = acc[c] * inv + rest * mean[c];
    kept_all += kept;
  }
  int64_t* cnt = P.counts + bh * kNumCounts;
  cnt[0] = kept_all;
  cnt[1] = rows;
  cnt[2] = blocks;
  cnt[3] = thresholded ? kept_all : 0;
}

// How many threads each call's parallel region gets. The whole team (ATen's
// thread count) by default; but a team call cannot end before every thread of
// the team has checked in, and a thread that shares its core with another
// process is off the core for whole time slices (milliseconds, against a
// 0.1-1 ms layer call). So each team call measures what the team cost against
// what the calling thread alone would have taken (its own time per unit of
// work, times the whole work). Calls go in windows: when a window of team
// calls cost more in all than the calling thread alone would have, the next
// calls run on the calling thread alone, then a window of team calls probes
// again; the solo stretch doubles while the probes keep losing. One long stall
// on an idle machine (an interrupt, a short-lived process) does not outweigh a
// window of team gains; a core lost to another process stalls call after call.
class TeamPolicy {
 public:
  static constexpr int64_t kWindow = 32;  // team calls per verdict: about one decode step of a small model
  static constexpr int64_t kFirstSoloStretch = 32;
  static constexpr int64_t kLongestSoloStretch = 512;

  // adaptive: as above; team: always the whole team; solo: always the calling
  // thread (for measuring one against the other, and for tests).
  enum class Mode { kAdaptive, kTeam, kSolo };

  int threads(int team) const {
    return mode_ == Mode::kSolo || (mode_ == Mode::kAdaptive && solo_left_ > 0) ? 1 : team;
  }
  // After every call: `team_seconds` the team's wall time, `solo_seconds` the
  // calling thread's estimate of the same work alone (< 0: no estimate).
  void record(int threads, double team_seconds, double solo_seconds) {
    if (threads == 1) {
      solo_calls_ += 1;
      if (solo_left_ > 0) solo_left_ -= 1;
      return;
    }
    team_calls_ += 1;
    if (solo_seconds < 0) return;
    lost_calls_ += team_seconds > solo_seconds;
    window_excess_ += team_seconds - solo_seconds;
    if (++window_calls_ < kWindow) return;
    if (window_excess_ > 0) {
      lost_windows_ += 1;
      solo_left_ = stretch_;
      stretch_ = std::min(2 * stretch_, kLongestSoloStretch);
    } else {
      stretch_ = kFirstSoloStretch;
    }
    window_calls_ = 0, window_excess_ = 0;
  }
  void set_mode(Mode mode) {
    mode_ = mode, solo_left_ = 0, window_calls_ = 0, window_excess_ = 0, stretch_ = kFirstSoloStretch;
  }
  std::tuple<int64_t, int64_t, int64_t, int64_t> counts() const {
    return {team_calls_, lost_calls_, lost_windows_, solo_calls_};
  }
  void reset_counts() { team_calls_ = lost_calls_ = lost_windows_ = solo_calls_ = 0; }

 private:
  Mode mode_ = Mode::kAdaptive;
  int64_t solo_left_ = 0, stretch_ = kFirstSoloStretch, window_calls_ = 0;
  double window_excess_ = 0;  // Σ (team - solo estimate) seconds over the window so far
  int64_t team_calls_ = 0, lost_calls_ = 0, lost_windows_ = 0, solo_calls_ = 0;
};

// One per calling thread (vLLM's model runner calls from one).
TeamPolicy& team_policy() {
  thread_local TeamPolicy policy;
  return policy;
}

// One parallel region per call, no barrier between phases. Threads claim
// tasks in order from shared counters (a thread that the OS deschedules holds
// at most one task, and the others take the rest); the thread that finishes
// the last score chunk of a (sequence, KV head) combines its heads, and the
// one that finishes its last value chunk completes it (phase C). A value
// chunk whose group is not combined yet spins (cpu_relax) for the one score
// chunk still running. The region's size comes from TeamPolicy.
template <typename T>
void run(Problem<T>& P) {
  TeamPolicy& policy = team_policy();
  const int team = static_cast<int>(std::max<int64_t>(1, at::get_num_threads()));
  std::vector<int64_t> first_task;
  const std::vector<Task> tasks = make_tasks(P.seq_block_offset, P.B, P.Hkv, policy.threads(team), first_task);
  const int64_t num_tasks = static_cast<int64_t>(tasks.size()), G = P.G, d = P.d, BH = P.B * P.Hkv;
  std::vector<Partial> parts(num_tasks * G);
  std::vector<HeadState> heads(BH * G);
  const int64_t mean_width = P.vmc_scope == kVmcBlock ? G * d : d;  // see value_chunk's mean_sum
  std::vector<float> partial_out(num_tasks * G * d), partial_mean(P.vmc ? num_tasks * mean_width : 0);
  std::vector<int64_t> rows_read(num_tasks, 0), blocks_read(num_tasks, 0);
  std::unique_ptr<std::atomic<int64_t>[]> scores_left(new std::atomic<int64_t>[BH]);
  std::unique_ptr<std::atomic<int64_t>[]> values_left(new std::atomic<int64_t>[BH]);
  std::unique_ptr<std::atomic<bool>[]> combined(new std::atomic<bool>[BH]);
  auto combine_group = [&](int64_t bh) {
    TOPT_PHASE(combine);
    const int64_t t0 = first_task[bh];
    for (int64_t g = 0; g < G; ++g)
      heads[bh * G + g] = combine_head(P, bh / P.Hkv, bh % P.Hkv, g, &parts[t0 * G], first_task[bh + 1] - t0, G);
  };
  auto finish = [&](int64_t bh) {
    TOPT_PHASE(finish);
    finish_group(P, bh, first_task[bh], first_task[bh + 1], heads.data(), parts.data(), partial_out.data(),
                 P.vmc ? partial_mean.data() : nullptr, rows_read.data(), blocks_read.data());
  };
  for (int64_t bh = 0; bh < BH; ++bh) {
    const int64_t count = first_task[bh + 1] - first_task[bh];
    scores_left[bh].store(count, std::memory_order_relaxed);
    values_left[bh].store(count, std::memory_order_relaxed);
    combined[bh].store(false, std::memory_order_relaxed);
    if (count == 0) combine_group(bh), finish(bh);  // an empty row: nothing to share
  }
  std::atomic<int64_t> next_score{0}, next_value{0};
  const int threads = static_cast<int>(std::min<int64_t>(policy.threads(team), std::max<int64_t>(1, num_tasks)));
  // What the calling thread (OpenMP's thread 0) did: blocks of work (a score and a
  // value task each weigh their blocks), and seconds spent waiting for another thread.
  int64_t caller_blocks = 0;
  double caller_waited = 0;
  Clock::time_point caller_done;
  const Clock::time_point start = Clock::now();
  TOPT_PHASE_SINCE_MARK(entry);
#pragma omp parallel num_threads(threads)
  {
    const bool caller = omp_get_thread_num() == 0;
    for (int64_t i; (i = next_score.fetch_add(1, std::memory_order_relaxed)) < num_tasks;) {
      score_chunk(P, tasks[i], &parts[i * G]);
      const int64_t bh = tasks[i].b * P.Hkv + tasks[i].h;
      if (caller) caller_blocks += tasks[i].blk_end - tasks[i].blk_begin;
      if (scores_left[bh].fetch_sub(1, std::memory_order_acq_rel) == 1) {
        combine_group(bh);
        combined[bh].store(true, std::memory_order_release);
      }
    }
    for (int64_t i; (i = next_value.fetch_add(1, std::memory_order_relaxed)) < num_tasks;) {
      const Task& task = tasks[i];
      const int64_t bh = task.b * P.Hkv + task.h;
      if (!combined[bh].load(std::memory_order_acquire)) {
        TOPT_PHASE(wait);
        const Clock::time_point wait_start = Clock::now();
        while (!combined[bh].load(std::memory_order_acquire)) cpu_relax();
        if (caller) caller_waited += seconds_since(wait_start);
      }
      value_chunk(P, task, &heads[bh * G], &parts[i * G], &partial_out[i * G * d],
                  P.vmc ? &partial_mean[i * mean_width] : nullptr, &rows_read[i], &blocks_read[i]);
      if (caller) caller_blocks += task.blk_end - task.blk_begin;
      if (values_left[bh].fetch_sub(1, std::memory_order_acq_rel) == 1) finish(bh);
    }
    if (caller) caller_done = Clock::now();
  }
  const double team_seconds = seconds_since(start);
  TOPT_PHASE_MARK();
  const double caller_working = std::chrono::duration<double>(caller_done - start).count() - caller_waited;
  const int64_t all_blocks = 2 * P.seq_block_offset[P.B] * P.Hkv;
  policy.record(threads, team_seconds,
                caller_blocks > 0 ? caller_working * static_cast<double>(all_blocks) / caller_blocks : -1.0);
}

// Scores of every sequence (and block-wise VMC's per-block log-sum-exp),
// reused across calls (no page faults per layer).
float* score_scratch(int64_t floats) {
  thread_local std::vector<float> scratch;
  if (static_cast<int64_t>(scratch.size()) < floats) scratch.resize(floats);
  return scratch.data();
}

}  // namespace

// Top-θ decode for B sequences, one query each. Writes out [B, H, d] (float32,
// contiguous) and returns the batch totals, named in the op schema below.
// theta: float32, [B, H] per row or, with theta_by_length, [N > max n, H] per
// row length; None for dense. A sequence is thresholded when theta is given
// and n > k.
using Totals = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

Totals topt_decode(
    const torch::Tensor& out, const torch::Tensor& query_in, const torch::Tensor& key_cache,
    const torch::Tensor& value_cache, const torch::Tensor& block_table, const torch::Tensor& seq_lens,
    const std::optional<torch::Tensor>& theta_in, bool theta_by_length,
    const std::optional<torch::Tensor>& v_block_sums_in, int64_t k, int64_t placement, int64_t sdc, bool vmc,
    int64_t vmc_scope, double scale, double soft_cap) {
  TOPT_PHASE(call);
  TOPT_PHASE_MARK();
  TORCH_CHECK(placement == kPostSoftmax || placement == kPreSoftmax, "unknown placement code ", placement);
  TORCH_CHECK(vmc_scope == kVmcSequence || vmc_scope == kVmcBlock, "unknown VMC scope code ", vmc_scope);
  TORCH_CHECK(sdc == kSdcNone || sdc == kSdcExact || sdc == kSdcExpThreshold, "unknown SDC code ", sdc);
  const bool has_theta = theta_in.has_value() && theta_in->numel() > 0;
  const bool has_sums = v_block_sums_in.has_value() && v_block_sums_in->numel() > 0;
  const torch::Tensor theta = has_theta ? *theta_in : torch::Tensor();
  const torch::Tensor v_block_sums = has_sums ? *v_block_sums_in : torch::Tensor();
  torch::Tensor query = query_in;
  TORCH_CHECK(out.dtype() == torch::kFloat32 && out.is_contiguous(), "out: contiguous float32");
  TORCH_CHECK(key_cache.stride(3) == 1 && key_cache.stride(2) == key_cache.size(3), "K block must be dense");
  TORCH_CHECK(block_table.dtype() == torch::kInt32 && seq_lens.dtype() == torch::kInt32, "int32 tables");
  TORCH_CHECK(key_cache.size(2) <= kMaxBlockSize, "block size above ", kMaxBlockSize);
  TORCH_CHECK(!has_theta || (theta.dtype() == torch::kFloat32 && theta.is_contiguous()), "theta: float32");
  TORCH_CHECK(!has_sums || v_block_sums.dtype() == torch::kFloat32, "v_block_sums: float32");
  if (query.dtype() != torch::kFloat32 || !query.is_contiguous()) query = query.to(torch::kFloat32).contiguous();
  const int64_t B = query.size(0), H = query.size(1), Hkv = key_cache.size(1), bs = key_cache.size(2);
  TORCH_CHECK(out.size(0) == B && out.size(1) == H && out.size(2) == query.size(2), "out: [B, H, d]");
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  std::vector<int64_t> block_offsets(B + 1, 0);
  std::unique_ptr<bool[]> sparse(new bool[B]);
  std::vector<int64_t> totals(7, 0);
  for (int64_t b = 0; b < B; ++b) {
    block_offsets[b + 1] = block_offsets[b] + (lens[b] + bs - 1) / bs;
    sparse[b] = has_theta && lens[b] > k;
    TORCH_CHECK(!theta_by_length || !has_theta || lens[b] < theta.size(0), "theta table shorter than row ", lens[b]);
    totals[4] += lens[b];
    totals[6] += sparse[b];
  }
  totals[5] = block_offsets[B];
  std::vector<int64_t> counts(B * Hkv * kNumCounts, 0);
  auto fill = [&](auto* typed_cache) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(typed_cache)>>;
    Problem<T> P;
    P.query = query.data_ptr<float>();
    P.key_cache = key_cache.data_ptr<T>();
    P.value_cache = value_cache.data_ptr<T>();
    P.block_table = block_table.data_ptr<int32_t>();
    P.seq_lens = lens;
    P.theta = has_theta ? theta.data_ptr<float>() : nullptr;
    P.theta_by_length = theta_by_length;
    P.sparse = sparse.get();
    P.v_block_sums = has_sums ? v_block_sums.data_ptr<float>() : nullptr;
    P.table_stride = block_table.stride(0);
    P.cache_block_stride = key_cache.stride(0);
    P.cache_head_stride = key_cache.stride(1);
    P.sums_block_stride = has_sums ? v_block_sums.stride(0) : 0;
    P.B = B;
    P.H = H;
    P.d = query.size(2);
    P.Hkv = Hkv;
    P.bs = bs;
    P.G = H / Hkv;
    P.placement = placement;
    P.sdc = sdc;
    P.vmc = vmc && P.v_block_sums != nullptr;
    P.vmc_scope = vmc_scope;
    P.scale = static_cast<float>(scale);
    P.soft_cap = static_cast<float>(soft_cap);
    const int64_t score_floats = block_offsets[B] * bs * H;
    const bool block_vmc = P.vmc && vmc_scope == kVmcBlock;
    P.scores = score_scratch(score_floats + (block_vmc ? block_offsets[B] * H : 0));
    P.block_lse = block_vmc ? P.scores + score_floats : nullptr;
    P.seq_block_offset = block_offsets.data();
    P.out = out.data_ptr<float>();
    P.counts = counts.data();
    run<T>(P);
  };
  const auto dtype = key_cache.scalar_type();
  if (dtype == torch::kFloat32) fill(static_cast<float*>(nullptr));
  else if (dtype == torch::kBFloat16) fill(static_cast<at::BFloat16*>(nullptr));
  else if (dtype == torch::kFloat16) fill(static_cast<at::Half*>(nullptr));
  else TORCH_CHECK(false, "unsupported KV cache dtype ", dtype);
  for (int64_t i = 0; i < B * Hkv; ++i)
    for (int j = 0; j < kNumCounts; ++j) totals[j] += counts[i * kNumCounts + j];
  TOPT_PHASE_SINCE_MARK(exit);
#ifdef TOPT_PROFILE_PHASES
  g_profiled_calls.fetch_add(1, std::memory_order_relaxed);
#endif
  return {totals[0], totals[1], totals[2], totals[3], totals[4], totals[5], totals[6]};
}

// Σ v per (block, KV head) as the cache is written; a write at offset 0
// starts the block's sum afresh (a block is always filled from offset 0).
// v_block_sums: [num_blocks, H_kv, d] float32; value: [N, H_kv, d]; slots: [>= N], -1 = padding.
void update_v_block_sums(const torch::Tensor& v_block_sums, const torch::Tensor& value,
                         const torch::Tensor& slot_mapping, int64_t block_size) {
  TORCH_CHECK(v_block_sums.dtype() == torch::kFloat32 && v_block_sums.is_contiguous(), "sums: contiguous float32");
  TORCH_CHECK(slot_mapping.dtype() == torch::kInt64, "slot_mapping: int64");
  auto v = value.to(torch::kFloat32).contiguous();
  const int64_t n = std::min(v.size(0), slot_mapping.size(0)), row = v.size(1) * v.size(2);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const float* vp = v.data_ptr<float>();
  float* sums = v_block_sums.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t slot = slots[i];
    if (slot < 0) continue;
    float* dst = sums + (slot / block_size) * row;
    if (slot % block_size == 0) std::fill(dst, dst + row, 0.f);
    const float* src = vp + i * row;
#pragma omp simd
    for (int64_t c = 0; c < row; ++c) dst[c] += src[c];
  }
}

// TeamPolicy of the calling thread: its calls so far (then zeroed if `reset`),
// and a switch for measuring a fixed team against the adaptive one.
std::tuple<int64_t, int64_t, int64_t, int64_t> team_counts(bool reset) {
  const auto counts = team_policy().counts();
  if (reset) team_policy().reset_counts();
  return counts;
}

// The phase profile so far (see TOPT_PHASES): phase names (comma-separated), nanoseconds per
// phase, calls timed; all zero unless built with -DTOPT_PROFILE_PHASES. `reset` zeroes it after reading.
std::tuple<std::string, std::vector<int64_t>, int64_t> phase_profile(bool reset) {
  std::string names;
  std::vector<int64_t> ns(kNumPhases);
  for (int i = 0; i < kNumPhases; ++i) {
    names += (i ? "," : "") + std::string(kPhaseNames[i]);
    ns[i] = reset ? g_phase_ns[i].exchange(0) : g_phase_ns[i].load();
  }
  return {names, ns, reset ? g_profiled_calls.exchange(0) : g_profiled_calls.load()};
}

void set_team_mode(const std::string& mode) {
  using Mode = TeamPolicy::Mode;
  TORCH_CHECK(mode == "adaptive" || mode == "team" || mode == "solo", "team mode: adaptive, team or solo, not ", mode);
  team_policy().set_mode(mode == "team" ? Mode::kTeam : mode == "solo" ? Mode::kSolo : Mode::kAdaptive);
}

// The typed ops: named arguments (Python may pass them by keyword) and named
// results; vllm_topt/kernels/cpu/cpp.py reads the result names from this schema.
TORCH_LIBRARY(vllm_topt, m) {
  m.def(
      "topt_decode(Tensor(a!) out, Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_table, "
      "Tensor seq_lens, Tensor? theta, bool theta_by_length, Tensor? v_block_sums, int k, int placement, int sdc, "
      "bool vmc, int vmc_scope, float scale, float soft_cap) -> (int elements_kept, int v_rows_read, int v_blocks_read, "
      "int thresholded_kept, int keys, int blocks, int thresholded_seqs)");
  m.impl("topt_decode", torch::kCPU, &topt_decode);
  m.def("update_v_block_sums(Tensor(a!) v_block_sums, Tensor value, Tensor slot_mapping, int block_size) -> ()");
  m.impl("update_v_block_sums", torch::kCPU, &update_v_block_sums);
  m.def("team_counts(bool reset) -> (int team_calls, int lost_team_calls, int lost_windows, int solo_calls)", &team_counts);
  m.def("set_team_mode(str mode) -> ()", &set_team_mode);
  m.def("phase_profile(bool reset) -> (str phases, int[] nanoseconds, int calls)", &phase_profile);
}
