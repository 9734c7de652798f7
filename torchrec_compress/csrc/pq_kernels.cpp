#include "pq_kernels.h"

#include <immintrin.h>

#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace torchrec_compress {

namespace portable {
#include "pq_kernels_impl.h"
}  // namespace portable

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace avx2 {
#define TORCHREC_COMPRESS_AVX2
#include "pq_kernels_impl.h"
#undef TORCHREC_COMPRESS_AVX2

// Rows encoded together: 4 rows x (distance + best value + best index) = 12 of the 16 AVX2
// registers, and each codeword load serves 4 rows.
constexpr int kRows = 4;
constexpr int64_t kBlockRows = 64;

// Lane-wise argmin over 8 candidates: the smallest value, then the smallest index among equals.
inline int32_t reduce_argmin(__m256 values, __m256i indices) {
  // Pairwise minima over 4, 2 and 1 lanes apart: every lane ends up with the minimum.
  __m256 v = _mm256_min_ps(values, _mm256_permute2f128_ps(values, values, 1));
  v = _mm256_min_ps(v, _mm256_shuffle_ps(v, v, 0x4E));
  v = _mm256_min_ps(v, _mm256_shuffle_ps(v, v, 0xB1));
  const __m256 at_best = _mm256_cmp_ps(values, v, _CMP_EQ_OQ);
  __m256i i = _mm256_castps_si256(_mm256_blendv_ps(
      _mm256_castsi256_ps(_mm256_set1_epi32(std::numeric_limits<int32_t>::max())),
      _mm256_castsi256_ps(indices), at_best));
  i = _mm256_min_epi32(i, _mm256_permute2x128_si256(i, i, 1));
  i = _mm256_min_epi32(i, _mm256_shuffle_epi32(i, 0x4E));
  i = _mm256_min_epi32(i, _mm256_shuffle_epi32(i, 0xB1));
  return _mm256_cvtsi256_si32(i);
}

// Fused distance + argmin: the distances of 4 rows to 8 codewords live in registers and are
// folded into a running per-lane minimum, so no [rows, K] distance matrix is ever written.
// DSUB > 0: a compile-time subspace width (the coordinate loop unrolled); 0: s.dsub at runtime.
template <int DSUB, typename code_t>
void encode_rows(
    const PQShape& s,
    const float* x,
    int64_t x_stride,
    const float* books_t,
    const float* norms,
    int64_t kpad,
    int64_t row_begin,
    int64_t row_end,
    code_t* codes,
    float* scaled /* [kRows * dsub] scratch */) {
  const int64_t M = s.num_subspaces;
  const int64_t dsub = DSUB > 0 ? DSUB : s.dsub;
  const __m256i lane_ids = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i step = _mm256_set1_epi32(8);
  // Subspace-major within blocks of kBlockRows rows: codebook m (8 KiB for K=256, dsub=8) stays
  // in L1 while the block's rows go past it.
  for (int64_t block = row_begin; block < row_end; block += kBlockRows) {
    const int64_t block_end = row_end - block < kBlockRows ? row_end : block + kBlockRows;
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t i0 = block; i0 < block_end; i0 += kRows) {
        const int64_t rows = block_end - i0 < kRows ? block_end - i0 : kRows;
        // 2x per row (a tail block repeats its last row): dist = ||c||^2 - sum_t (2 x_t) c_t.
        for (int r = 0; r < kRows; ++r) {
          const float* sub = x + (i0 + (r < rows ? r : rows - 1)) * x_stride + m * dsub;
          for (int64_t t = 0; t < dsub; ++t) {
            scaled[r * dsub + t] = 2.0f * sub[t];
          }
        }
        const float* book = books_t + m * dsub * kpad;
        const float* norm = norms + m * kpad;
        __m256 best_v[kRows];
        __m256i best_i[kRows];
        for (int r = 0; r < kRows; ++r) {
          best_v[r] = _mm256_set1_ps(std::numeric_limits<float>::infinity());
          best_i[r] = _mm256_setzero_si256();
        }
        __m256i idx = lane_ids;
        for (int64_t k = 0; k < kpad; k += 8) {
          const __m256 n = _mm256_loadu_ps(norm + k);
          __m256 d[kRows];
          for (int r = 0; r < kRows; ++r) {
            d[r] = n;
          }
          for (int64_t t = 0; t < dsub; ++t) {
            const __m256 c = _mm256_loadu_ps(book + t * kpad + k);
            for (int r = 0; r < kRows; ++r) {
              d[r] = _mm256_fnmadd_ps(_mm256_broadcast_ss(scaled + r * dsub + t), c, d[r]);
            }
          }
          for (int r = 0; r < kRows; ++r) {
            // Strict < keeps the first codeword of each lane on ties; min(d, best) is
            // d < best ? d : best, the same choice, without waiting for the compare.
            const __m256 less = _mm256_cmp_ps(d[r], best_v[r], _CMP_LT_OQ);
            best_v[r] = _mm256_min_ps(d[r], best_v[r]);
            best_i[r] = _mm256_castps_si256(
                _mm256_blendv_ps(_mm256_castsi256_ps(best_i[r]), _mm256_castsi256_ps(idx), less));
          }
          idx = _mm256_add_epi32(idx, step);
        }
        for (int r = 0; r < rows; ++r) {
          codes[(i0 + r) * M + m] = static_cast<code_t>(reduce_argmin(best_v[r], best_i[r]));
        }
      }
    }
  }
}

template <typename code_t>
void encode(
    const PQShape& s,
    const float* x,
    int64_t x_stride,
    const float* books_t,
    const float* norms,
    int64_t kpad,
    int64_t row_begin,
    int64_t row_end,
    code_t* codes) {
  std::vector<float> scaled(kRows * s.dsub);
  float* buf = scaled.data();
  switch (s.dsub) {
    case 1:
      return encode_rows<1>(s, x, x_stride, books_t, norms, kpad, row_begin, row_end, codes, buf);
    case 2:
      return encode_rows<2>(s, x, x_stride, books_t, norms, kpad, row_begin, row_end, codes, buf);
    case 4:
      return encode_rows<4>(s, x, x_stride, books_t, norms, kpad, row_begin, row_end, codes, buf);
    case 8:
      return encode_rows<8>(s, x, x_stride, books_t, norms, kpad, row_begin, row_end, codes, buf);
    case 16:
      return encode_rows<16>(s, x, x_stride, books_t, norms, kpad, row_begin, row_end, codes, buf);
    default:  // other widths read dsub at runtime
      return encode_rows<0>(s, x, x_stride, books_t, norms, kpad, row_begin, row_end, codes, buf);
  }
}
}  // namespace avx2

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")

// AVX-512 (x86-64-v4) encoder; every other kernel of kAvx512 is the AVX2 one.  The distance of a
// codeword is computed with the same fused operations in the same order as the AVX2 encoder
// (||c||^2, then one fnmadd per coordinate), and the argmin keeps the smallest distance and then
// the smallest index, so both give the same codes bit for bit whatever the vector width.
namespace avx512 {

// Rows encoded together: each codeword load serves kRows rows, and per row a 16-codeword step
// costs DSUB fused multiply-adds plus one compare, one min and one masked index move.
constexpr int kRows = 4;
constexpr int64_t kBlockRows = 64;

// Smallest value over the 16 lanes, then the smallest index among the lanes holding it.  (The
// masked forms of the intrinsics, all lanes on, keep GCC 12 from warning about the undefined
// pass-through operand of the plain ones.)
inline int32_t reduce_argmin(__m512 values, __m512i indices) {
  constexpr __mmask16 kAll = 0xFFFF;
  // Pairwise minima over 8, 4, 2 and 1 lanes apart: every lane ends up with the minimum.
  __m512 v = values;
  v = _mm512_mask_min_ps(v, kAll, v, _mm512_mask_shuffle_f32x4(v, kAll, v, v, 0x4E));
  v = _mm512_mask_min_ps(v, kAll, v, _mm512_mask_shuffle_f32x4(v, kAll, v, v, 0xB1));
  v = _mm512_mask_min_ps(v, kAll, v, _mm512_mask_permute_ps(v, kAll, v, 0x4E));
  v = _mm512_mask_min_ps(v, kAll, v, _mm512_mask_permute_ps(v, kAll, v, 0xB1));
  const __mmask16 at_best = _mm512_cmp_ps_mask(values, v, _CMP_EQ_OQ);
  __m512i i = _mm512_mask_blend_epi32(
      at_best, _mm512_set1_epi32(std::numeric_limits<int32_t>::max()), indices);
  i = _mm512_mask_min_epi32(i, kAll, i, _mm512_mask_shuffle_i32x4(i, kAll, i, i, 0x4E));
  i = _mm512_mask_min_epi32(i, kAll, i, _mm512_mask_shuffle_i32x4(i, kAll, i, i, 0xB1));
  i = _mm512_mask_min_epi32(i, kAll, i, _mm512_mask_shuffle_epi32(i, kAll, i, _MM_PERM_BADC));
  i = _mm512_mask_min_epi32(i, kAll, i, _mm512_mask_shuffle_epi32(i, kAll, i, _MM_PERM_CDAB));
  return _mm512_cvtsi512_si32(i);
}

// DSUB > 0: a compile-time subspace width; DSUB == 0: s.dsub read at runtime.
template <int DSUB, typename code_t>
void encode_rows(
    const PQShape& s,
    const float* x,
    int64_t x_stride,
    const float* books_t,
    const float* norms,
    int64_t kpad /* a multiple of 16 */,
    int64_t row_begin,
    int64_t row_end,
    code_t* codes,
    float* scaled /* [kRows * dsub] scratch */) {
  const int64_t M = s.num_subspaces;
  const int64_t dsub = DSUB > 0 ? DSUB : s.dsub;
  const __m512i lane_ids = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  for (int64_t block = row_begin; block < row_end; block += kBlockRows) {
    const int64_t block_end = row_end - block < kBlockRows ? row_end : block + kBlockRows;
    for (int64_t m = 0; m < M; ++m) {
      const float* book = books_t + m * dsub * kpad;
      const float* norm = norms + m * kpad;
      for (int64_t i0 = block; i0 < block_end; i0 += kRows) {
        const int64_t rows = block_end - i0 < kRows ? block_end - i0 : kRows;
        // 2x per row (a tail block repeats its last row): dist = ||c||^2 - sum_t (2 x_t) c_t.
        for (int r = 0; r < kRows; ++r) {
          const float* sub = x + (i0 + (r < rows ? r : rows - 1)) * x_stride + m * dsub;
          for (int64_t t = 0; t < dsub; ++t) {
            scaled[r * dsub + t] = 2.0f * sub[t];
          }
        }
        __m512 best_v[kRows];
        __m512i best_i[kRows];
        for (int r = 0; r < kRows; ++r) {
          best_v[r] = inf;
          best_i[r] = _mm512_setzero_si512();
        }
        __m512i idx = lane_ids;
        for (int64_t k = 0; k < kpad; k += 16) {
          const __m512 n = _mm512_loadu_ps(norm + k);
          __m512 d[kRows];
          for (int r = 0; r < kRows; ++r) {
            d[r] = n;
          }
          for (int64_t t = 0; t < dsub; ++t) {
            const __m512 c = _mm512_loadu_ps(book + t * kpad + k);
            for (int r = 0; r < kRows; ++r) {
              d[r] = _mm512_fnmadd_ps(_mm512_set1_ps(scaled[r * dsub + t]), c, d[r]);
            }
          }
          for (int r = 0; r < kRows; ++r) {
            // Strict < keeps the first codeword of each lane on ties; min(d, best) is
            // d < best ? d : best, the same choice, without waiting for the compare.
            const __mmask16 less = _mm512_cmp_ps_mask(d[r], best_v[r], _CMP_LT_OQ);
            best_v[r] = _mm512_mask_min_ps(best_v[r], 0xFFFF, d[r], best_v[r]);
            best_i[r] = _mm512_mask_mov_epi32(best_i[r], less, idx);
          }
          idx = _mm512_add_epi32(idx, step);
        }
        for (int r = 0; r < rows; ++r) {
          codes[(i0 + r) * M + m] = static_cast<code_t>(reduce_argmin(best_v[r], best_i[r]));
        }
      }
    }
  }
}

template <typename code_t>
void encode(
    const PQShape& s,
    const float* x,
    int64_t x_stride,
    const float* books_t,
    const float* norms,
    int64_t kpad,
    int64_t row_begin,
    int64_t row_end,
    code_t* codes) {
  std::vector<float> scaled(kRows * s.dsub);
  float* buf = scaled.data();
  switch (s.dsub) {
    case 1:
      return encode_rows<1>(s, x, x_stride, books_t, norms, kpad, row_begin, row_end, codes, buf);
    case 2:
      return encode_rows<2>(s, x, x_stride, books_t, norms, kpad, row_begin, row_end, codes, buf);
    case 4:
      return encode_rows<4>(s, x, x_stride, books_t, norms, kpad, row_begin, row_end, codes, buf);
    case 8:
      return encode_rows<8>(s, x, x_stride, books_t, norms, kpad, row_begin, row_end, codes, buf);
    case 16:
      return encode_rows<16>(s, x, x_stride, books_t, norms, kpad, row_begin, row_end, codes, buf);
    default:  // other widths read dsub at runtime
      return encode_rows<0>(s, x, x_stride, books_t, norms, kpad, row_begin, row_end, codes, buf);
  }
}
}  // namespace avx512

#pragma GCC pop_options

Isa best_isa() {
  static const Isa isa = [] {
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
          __builtin_cpu_supports("f16c"))) {
      return Isa::kGeneric;
    }
    return (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
        ? Isa::kAvx512
        : Isa::kAvx2;
  }();
  return isa;
}

int64_t encode_kpad(Isa isa, int64_t ksub) {
  const int64_t width = isa == Isa::kAvx512 ? 16 : 8;
  return (ksub + width - 1) / width * width;
}

template <typename code_t, typename index_t>
int64_t pooled_lookup(
    Isa isa,
    const PQShape& shape,
    const code_t* codes,
    const float* codebooks,
    const index_t* ids,
    const index_t* offsets,
    const float* weights,
    int64_t bag_begin,
    int64_t bag_end,
    float* out) {
  if (isa != Isa::kGeneric) {
    return avx2::pooled_lookup(
        shape, codes, codebooks, ids, offsets, weights, bag_begin, bag_end, out);
  }
  return portable::pooled_lookup(
      shape, codes, codebooks, ids, offsets, weights, bag_begin, bag_end, out);
}

template <typename code_t, typename index_t>
void pooled_lookup_backward(
    Isa isa,
    const PQShape& shape,
    const code_t* codes,
    const index_t* ids,
    const index_t* offsets,
    const float* weights,
    int64_t num_bags,
    const float* grad_out,
    int64_t m_begin,
    int64_t m_end,
    float* grad_codebooks) {
  if (isa != Isa::kGeneric) {
    avx2::pooled_lookup_backward(
        shape, codes, ids, offsets, weights, num_bags, grad_out, m_begin, m_end, grad_codebooks);
  } else {
    portable::pooled_lookup_backward(
        shape, codes, ids, offsets, weights, num_bags, grad_out, m_begin, m_end, grad_codebooks);
  }
}

template <typename code_t>
void encode(
    Isa isa,
    const PQShape& shape,
    const float* x,
    int64_t x_stride,
    const float* books_t,
    const float* norms,
    int64_t kpad,
    int64_t row_begin,
    int64_t row_end,
    code_t* codes) {
  if (isa == Isa::kAvx512) {
    avx512::encode(shape, x, x_stride, books_t, norms, kpad, row_begin, row_end, codes);
  } else if (isa == Isa::kAvx2) {
    avx2::encode(shape, x, x_stride, books_t, norms, kpad, row_begin, row_end, codes);
  } else {
    std::vector<float> distances(kpad);
    portable::encode_portable(
        shape, x, x_stride, books_t, norms, kpad, row_begin, row_end, codes, distances.data());
  }
}

template <typename index_t>
int64_t factor_pooled_lookup(
    Isa isa,
    const float* table,
    int64_t num_rows,
    int64_t k,
    const index_t* ids,
    const index_t* offsets,
    const float* weights,
    bool mean,
    int64_t bag_begin,
    int64_t bag_end,
    float* out) {
  if (isa != Isa::kGeneric) {
    return avx2::factor_pooled_lookup(
        table, num_rows, k, ids, offsets, weights, mean, bag_begin, bag_end, out);
  }
  return portable::factor_pooled_lookup(
      table, num_rows, k, ids, offsets, weights, mean, bag_begin, bag_end, out);
}

template <typename index_t>
int64_t int8_pooled_lookup(
    Isa isa,
    const uint8_t* rows,
    int64_t num_rows,
    int64_t row_bytes,
    int64_t dim,
    const index_t* ids,
    const index_t* offsets,
    const float* weights,
    bool mean,
    int64_t bag_begin,
    int64_t bag_end,
    float* out) {
  if (isa != Isa::kGeneric) {
    return avx2::int8_pooled_lookup(
        rows, num_rows, row_bytes, dim, ids, offsets, weights, mean, bag_begin, bag_end, out);
  }
  return portable::int8_pooled_lookup(
      rows, num_rows, row_bytes, dim, ids, offsets, weights, mean, bag_begin, bag_end, out);
}

template int64_t int8_pooled_lookup<int32_t>(
    Isa, const uint8_t*, int64_t, int64_t, int64_t, const int32_t*, const int32_t*, const float*,
    bool, int64_t, int64_t, float*);
template int64_t int8_pooled_lookup<int64_t>(
    Isa, const uint8_t*, int64_t, int64_t, int64_t, const int64_t*, const int64_t*, const float*,
    bool, int64_t, int64_t, float*);

template int64_t factor_pooled_lookup<int32_t>(
    Isa, const float*, int64_t, int64_t, const int32_t*, const int32_t*, const float*, bool,
    int64_t, int64_t, float*);
template int64_t factor_pooled_lookup<int64_t>(
    Isa, const float*, int64_t, int64_t, const int64_t*, const int64_t*, const float*, bool,
    int64_t, int64_t, float*);

#define TORCHREC_COMPRESS_LOOKUP(code_t, index_t)                                              \
  template int64_t pooled_lookup<code_t, index_t>(                                             \
      Isa, const PQShape&, const code_t*, const float*, const index_t*, const index_t*,        \
      const float*, int64_t, int64_t, float*);                                                 \
  template void pooled_lookup_backward<code_t, index_t>(                                       \
      Isa, const PQShape&, const code_t*, const index_t*, const index_t*, const float*,        \
      int64_t, const float*, int64_t, int64_t, float*);
#define TORCHREC_COMPRESS_CODE_TYPE(code_t)                                                    \
  TORCHREC_COMPRESS_LOOKUP(code_t, int32_t)                                                    \
  TORCHREC_COMPRESS_LOOKUP(code_t, int64_t)                                                    \
  template void encode<code_t>(                                                                \
      Isa, const PQShape&, const float*, int64_t, const float*, const float*, int64_t,         \
      int64_t, int64_t, code_t*);
TORCHREC_COMPRESS_CODE_TYPE(uint8_t)
TORCHREC_COMPRESS_CODE_TYPE(int16_t)
TORCHREC_COMPRESS_CODE_TYPE(int32_t)
#undef TORCHREC_COMPRESS_CODE_TYPE
#undef TORCHREC_COMPRESS_LOOKUP

}  // namespace torchrec_compress
