// Top-θ decode attention over vLLM's CPU paged KV cache (one query per sequence).
//
// One task per (sequence, KV head): pass 1 reads the sequence's K blocks in
// full (scores for the G query heads of the group, row max, softmax sum);
// the threshold then marks the rows each head keeps; pass 2 reads only the V
// blocks holding at least one kept row of any head of the group. VMC takes
// mean(V) from per-block V sums. Semantics: vllm_topt/reference.py (SPEC §2-5).
//
// Layout (vLLM CPU_ATTN, ISA "vec"): a K block is stored transposed,
// [head_size][block_size]; a V block row-major, [block_size][head_size].

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

enum Placement { kPostSoftmax = 0, kPreSoftmax = 1 };
enum Sdc { kSdcNone = 0, kSdcExact = 1, kSdcExpThreshold = 2 };

// Counts per task: kept elements, V rows read, V blocks read, kept in thresholded rows.
constexpr int kNumCounts = 4;

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }

// exp(x) for x <= 0 (scores minus the row max), written so GCC vectorises it:
// exp(x) = 2^k * exp(r), r = x - k ln2 in [-ln2/2, ln2/2], degree-6 Taylor
// polynomial (relative error < 2e-7). Inputs below -87 give ~1e-38, not 0.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float k = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - k * 0.693145751953125f - k * 1.428606765330187e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Scores of G query heads against one K block stored [d][BS]. With BS known
// at compile time the BS accumulators of a head stay in registers across the
// d-loop. s[g * s_stride + t] receives q_g . k_t.
template <typename T, int BS>
void block_scores(const float* q, const T* kb, float* s, int64_t G, int64_t d, int64_t s_stride) {
  for (int64_t g = 0; g < G; ++g) {
    float acc[BS] = {};
    const float* qg = q + g * d;
    for (int64_t c = 0; c < d; ++c) {
      const float qc = qg[c];
      const T* krow = kb + c * BS;  // transposed block: row c holds dim c of all BS keys
      for (int t = 0; t < BS; ++t) acc[t] += qc * to_float(krow[t]);
    }
    float* out = s + g * s_stride;
    for (int t = 0; t < BS; ++t) out[t] = acc[t];
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
void decode_task(
    int64_t b, int64_t hkv, const float* query, const T* key_cache, const T* value_cache,
    const int32_t* block_table, int64_t table_stride, int64_t n, const float* theta,
    const float* v_block_sums, float* out, int64_t* counts,
    int64_t H, int64_t G, int64_t d, int64_t bs,
    int64_t cache_block_stride, int64_t cache_head_stride, int64_t sums_block_stride,
    bool sparse, int64_t placement, int64_t sdc, bool vmc, double scale, double soft_cap) {
  const int64_t nb = (n + bs - 1) / bs;
  const int32_t* table = block_table + b * table_stride;
  std::vector<float> s(G * nb * bs);  // scores, then weights
  const float* q = query + (b * H + hkv * G) * d;

  // Pass 1: scores s[g][j] = q_g . k_j over all n keys (K read in full).
  for (int64_t blk = 0; blk < nb; ++blk) {
    const T* kb = key_cache + table[blk] * cache_block_stride + hkv * cache_head_stride;
    float* sb = s.data() + blk * bs;
    switch (bs) {
      case 32: block_scores<T, 32>(q, kb, sb, G, d, nb * bs); break;
      case 64: block_scores<T, 64>(q, kb, sb, G, d, nb * bs); break;
      default: block_scores_any<T>(q, kb, sb, G, d, bs, nb * bs);
    }
  }
  std::vector<float> m(G), kept_sum(G, 0.f), e(nb * bs);
  std::vector<uint8_t> row_needed(nb * bs, 0);
  int64_t kept = 0, kept_thresholded = 0;
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s.data() + g * nb * bs;
    const float sc = static_cast<float>(scale);
    float mx = -std::numeric_limits<float>::infinity();
    if (soft_cap > 0) {
      const float cap = static_cast<float>(soft_cap);
      for (int64_t j = 0; j < n; ++j) sg[j] = cap * std::tanh(sg[j] * sc / cap);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) sg[j] *= sc;
    }
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, sg[j]);
    // One exp per element, in a loop the compiler vectorises.
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      e[j] = exp_nonpositive(sg[j] - mx);
      sum += e[j];
    }
    m[g] = mx;
    const float th = sparse ? theta[b * H + hkv * G + g] : 0.f;
    // Keep decision (SPEC §3) on p = e / S or on the score; weights overwrite the scores.
    int64_t kept_g = 0;
    float e_kept = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      const bool keep = !sparse || (placement == kPostSoftmax ? (e[j] / sum > th) : (sg[j] > th));
      row_needed[j] |= keep;
      kept_g += keep;
      e_kept += keep ? e[j] : 0.f;
      sg[j] = keep ? e[j] : 0.f;
    }
    // SPEC §4: post-softmax (and dense) keeps the dense p of kept elements.
    float denom = sum;
    if (sparse && placement == kPreSoftmax) {
      float D = 0.f;
      if (sdc == kSdcExact) D = sum - e_kept;
      else if (sdc == kSdcExpThreshold) D = static_cast<float>(n - kept_g) * std::exp(th - mx);
      denom = std::max(e_kept + D, std::numeric_limits<float>::min());
    }
    const float inv = 1.f / denom;
    float wsum = 0.f;
#pragma omp simd reduction(+ : wsum)
    for (int64_t j = 0; j < n; ++j) {
      sg[j] *= inv;
      wsum += sg[j];
    }
    kept_sum[g] = wsum;
    kept += kept_g;
    if (sparse) kept_thresholded += kept_g;
  }

  // Pass 2: out_g = sum_j w_gj v_j over the V blocks with a needed row only.
  float* o = out + (b * H + hkv * G) * d;
  for (int64_t i = 0; i < G * d; ++i) o[i] = 0.f;
  int64_t rows_read = 0, blocks_read = 0;
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t rows = std::min(bs, n - blk * bs);
    bool any = false;
    for (int64_t t = 0; t < rows; ++t) {
      if (row_needed[blk * bs + t]) { any = true; ++rows_read; }
    }
    if (!any) continue;  // the whole V page stays unread
    ++blocks_read;
    const T* vb = value_cache + table[blk] * cache_block_stride + hkv * cache_head_stride;
    for (int64_t t = 0; t < rows; ++t) {
      if (!row_needed[blk * bs + t]) continue;
      const T* vrow = vb + t * d;
      for (int64_t g = 0; g < G; ++g) {
        const float w = s[g * nb * bs + blk * bs + t];
        if (w == 0.f) continue;
        float* og = o + g * d;
        for (int64_t c = 0; c < d; ++c) og[c] += w * to_float(vrow[c]);
      }
    }
  }
  if (sparse && vmc) {
    // mean(v_1..v_n) from per-block sums: O(blocks * d), no V rows read.
    std::vector<float> mean(d, 0.f);
    for (int64_t blk = 0; blk < nb; ++blk) {
      const float* sb = v_block_sums + table[blk] * sums_block_stride + hkv * d;
      for (int64_t c = 0; c < d; ++c) mean[c] += sb[c];
    }
    for (int64_t g = 0; g < G; ++g) {
      const float rest = (1.f - kept_sum[g]) / static_cast<float>(n);
      float* og = o + g * d;
      for (int64_t c = 0; c < d; ++c) og[c] += rest * mean[c];
    }
  }
  int64_t* cnt = counts + (b * (H / G) + hkv) * kNumCounts;
  cnt[0] = kept;
  cnt[1] = rows_read;
  cnt[2] = blocks_read;
  cnt[3] = kept_thresholded;
}

template <typename T>
void run(const torch::Tensor& query, const torch::Tensor& key_cache, const torch::Tensor& value_cache,
         const torch::Tensor& block_table, const torch::Tensor& seq_lens, const torch::Tensor& theta,
         const torch::Tensor& sparse_rows, const torch::Tensor& v_block_sums, torch::Tensor& out,
         torch::Tensor& counts, int64_t placement, int64_t sdc, bool vmc, double scale, double soft_cap) {
  const int64_t B = query.size(0), H = query.size(1), d = query.size(2);
  const int64_t Hkv = key_cache.size(1), bs = key_cache.size(2), G = H / Hkv;
  const float* q = query.data_ptr<float>();
  const T* kc = key_cache.data_ptr<T>();
  const T* vc = value_cache.data_ptr<T>();
  const int32_t* bt = block_table.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const bool* sparse = sparse_rows.data_ptr<bool>();
  const float* th = theta.numel() ? theta.data_ptr<float>() : nullptr;
  const float* sums = v_block_sums.numel() ? v_block_sums.data_ptr<float>() : nullptr;
  const int64_t sums_stride = v_block_sums.numel() ? v_block_sums.stride(0) : 0;
  float* o = out.data_ptr<float>();
  int64_t* c = counts.data_ptr<int64_t>();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv;
      decode_task<T>(b, h, q, kc, vc, bt, block_table.stride(0), lens[b], th, sums, o, c, H, G, d, bs,
                     key_cache.stride(0), key_cache.stride(1), sums_stride, sparse[b], placement, sdc, vmc,
                     scale, soft_cap);
    }
  });
}

}  // namespace

// Returns (out [B, H, d] float32, counts [B, H_kv, 4] int64).
std::vector<torch::Tensor> topt_decode(
    torch::Tensor query, torch::Tensor key_cache, torch::Tensor value_cache, torch::Tensor block_table,
    torch::Tensor seq_lens, torch::Tensor theta, torch::Tensor sparse_rows, torch::Tensor v_block_sums,
    int64_t placement, int64_t sdc, bool vmc, double scale, double soft_cap) {
  TORCH_CHECK(query.dtype() == torch::kFloat32 && query.is_contiguous(), "query: contiguous float32");
  TORCH_CHECK(key_cache.stride(3) == 1 && key_cache.stride(2) == key_cache.size(3), "K block must be dense");
  TORCH_CHECK(block_table.dtype() == torch::kInt32 && seq_lens.dtype() == torch::kInt32, "int32 tables");
  TORCH_CHECK(sparse_rows.dtype() == torch::kBool, "sparse_rows: bool");
  const int64_t B = query.size(0), H = query.size(1), d = query.size(2), Hkv = key_cache.size(1);
  auto out = torch::empty({B, H, d}, query.options());
  auto counts = torch::zeros({B, Hkv, kNumCounts}, query.options().dtype(torch::kInt64));
  if (key_cache.scalar_type() == torch::kFloat32) {
    run<float>(query, key_cache, value_cache, block_table, seq_lens, theta, sparse_rows, v_block_sums, out,
               counts, placement, sdc, vmc, scale, soft_cap);
  } else if (key_cache.scalar_type() == torch::kBFloat16) {
    run<at::BFloat16>(query, key_cache, value_cache, block_table, seq_lens, theta, sparse_rows, v_block_sums,
                      out, counts, placement, sdc, vmc, scale, soft_cap);
  } else if (key_cache.scalar_type() == torch::kFloat16) {
    run<at::Half>(query, key_cache, value_cache, block_table, seq_lens, theta, sparse_rows, v_block_sums,
                  out, counts, placement, sdc, vmc, scale, soft_cap);
  } else {
    TORCH_CHECK(false, "unsupported KV cache dtype ", key_cache.scalar_type());
  }
  return {out, counts};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("topt_decode", &topt_decode, "Top-θ decode attention over the CPU paged KV cache");
}
