// Kernel bodies, written once over a small SIMD-word abstraction (Simd<4> = SSE, Simd<8> = AVX2).
// pq_kernels.cpp includes this file once per instruction set, inside a namespace and a
// `#pragma GCC target` region (TORCHREC_COMPRESS_AVX2 defined for the AVX2 copy), so the same
// source yields an x86-64-v2 and an AVX2 copy.  Only headers already included by pq_kernels.cpp
// may be used here (a target pragma must not wrap standard headers).


// Ids ahead of the one being pooled whose rows (code rows, factor rows) are requested from
// memory: a sliding window over every id of a thread's bags, so that row misses overlap the adds
// of the ids before them.
constexpr int64_t kPrefetchIds = 64;

// The first position in [start, end) whose id is outside [0, num_rows), or -1.
template <typename index_t>
inline int64_t first_bad_id(const index_t* ids, int64_t num_rows, int64_t start, int64_t end) {
  bool all_ok = true;
  for (int64_t j = start; j < end; ++j) {  // branch-free, vectorized: the common all-valid case
    const int64_t id = static_cast<int64_t>(ids[j]);
    all_ok &= (id >= 0) & (id < num_rows);
  }
  if (all_ok) {
    return -1;
  }
  for (int64_t j = start; j < end; ++j) {
    if (static_cast<int64_t>(ids[j]) < 0 || static_cast<int64_t>(ids[j]) >= num_rows) {
      return j;
    }
  }
  return -1;
}

// Checks the ids of bag [start, end) and prefetches their code rows.  Returns the position of
// the first invalid id or code, or -1.  Checking codes reads the rows, so it happens only when
// the code type can hold values >= ksub.
template <typename code_t, typename index_t>
inline int64_t check_and_prefetch(
    const PQShape& s,
    const code_t* codes,
    const index_t* ids,
    int64_t start,
    int64_t end,
    bool check_codes) {
  for (int64_t j = start; j < end; ++j) {
    const int64_t id = static_cast<int64_t>(ids[j]);
    if (id < 0 || id >= s.num_rows) {
      return j;
    }
    const code_t* row = codes + id * s.num_subspaces;
    if (check_codes) {
      for (int64_t m = 0; m < s.num_subspaces; ++m) {
        if (static_cast<int64_t>(row[m]) < 0 || static_cast<int64_t>(row[m]) >= s.ksub) {
          return j;
        }
      }
    } else {
      __builtin_prefetch(row);
    }
  }
  return -1;
}

// SIMD words of LANES floats: 4 (SSE, in every x86-64 CPU) or 8 (AVX2).  The register-blocked
// kernel below keeps a bag's partial sums in these; plain loops were not kept in registers by GCC.
template <int LANES>
struct Simd;

template <>
struct Simd<4> {
  using type = __m128;
  static type zero() { return _mm_setzero_ps(); }
  static type load(const float* p) { return _mm_loadu_ps(p); }
  static type set1(float x) { return _mm_set1_ps(x); }
  static type add(type a, type b) { return _mm_add_ps(a, b); }
  static type mul_add(type w, type x, type acc) { return _mm_add_ps(_mm_mul_ps(w, x), acc); }
  static void store(float* p, type x) { _mm_storeu_ps(p, x); }
  // 4 bytes widened to floats.
  static type load_bytes(const uint8_t* p) {
    int32_t four;
    __builtin_memcpy(&four, p, sizeof(four));
    return _mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(four)));
  }
};

#ifdef TORCHREC_COMPRESS_AVX2
template <>
struct Simd<8> {
  using type = __m256;
  static type zero() { return _mm256_setzero_ps(); }
  static type load(const float* p) { return _mm256_loadu_ps(p); }
  static type set1(float x) { return _mm256_set1_ps(x); }
  static type add(type a, type b) { return _mm256_add_ps(a, b); }
  static type mul_add(type w, type x, type acc) { return _mm256_fmadd_ps(w, x, acc); }
  static void store(float* p, type x) { _mm256_storeu_ps(p, x); }
  static type load_bytes(const uint8_t* p) {
    return _mm256_cvtepi32_ps(
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
};
constexpr int kMaxLanes = 8;
#else
constexpr int kMaxLanes = 4;
#endif

// Floats per SIMD word for a subspace width.
constexpr int lanes_for(int dsub) {
  return dsub % kMaxLanes == 0 ? kMaxLanes : 4;
}

// ---- PQ pooled lookup of byte codes ------------------------------------------------------------

// The first position in [start, end) with an id outside [0, num_rows) or a code outside
// [0, ksub), or -1.  Reads the code rows of valid ids only.
template <typename index_t>
inline int64_t first_bad_code_row(
    const PQShape& s, const uint8_t* codes, const index_t* ids, int64_t start, int64_t end) {
  for (int64_t j = start; j < end; ++j) {
    const int64_t id = static_cast<int64_t>(ids[j]);
    if (id < 0 || id >= s.num_rows) {
      return j;
    }
    const uint8_t* row = codes + id * s.num_subspaces;
    uint8_t largest = 0;
    for (int64_t m = 0; m < s.num_subspaces; ++m) {
      largest = row[m] > largest ? row[m] : largest;
    }
    if (largest >= s.ksub) {
      return j;
    }
  }
  return -1;
}

// Subspaces pooled per pass over a bag's ids.  Unweighted, a block's partial sums fill all 16
// SIMD registers (each codeword is added straight from memory, so it needs none): with AVX2 one
// pass covers M = 16 subspaces of 8 floats.  Weighted, the FMA also needs the broadcast weight,
// so partial sums take 8.  Widths that are not a multiple of 4 pool 32 floats per pass.
constexpr int block_subspaces(int dsub, bool weighted) {
  if (dsub % 4 != 0) {
    return 32 / dsub > 0 ? 32 / dsub : 1;
  }
  const int words = dsub / lanes_for(dsub);
  const int registers = weighted ? 8 : 16;
  return registers / words > 0 ? registers / words : 1;
}

// Adds the codewords of subspaces [m0, m0 + NB) of the ids [start, end) of one bag into
// out[m0 * DSUB ...], requesting the code row kPrefetchIds ids ahead (up to prefetch_end).
// KSUB > 0 is the codebook size known at compile time (256 for byte codes): each codeword is then
// one load at a constant displacement (the subspace) plus the code times the codeword's bytes,
// i.e. three instructions per subspace and id: load the code, shift it, add the codeword.
template <int DSUB, int KSUB, int NB, bool WEIGHTED, typename index_t>
inline void pool_block(
    const PQShape& s,
    const uint8_t* codes,
    const float* codebooks,
    const index_t* ids,
    const float* weights,
    int64_t start,
    int64_t end,
    int64_t prefetch_end,
    int64_t m0,
    float* out) {
  constexpr uint64_t kWordBytes = DSUB * sizeof(float);
  const int64_t M = s.num_subspaces;
  const int64_t book_bytes = (KSUB > 0 ? KSUB : s.ksub) * static_cast<int64_t>(kWordBytes);
  const char* books = reinterpret_cast<const char*>(codebooks) + m0 * book_bytes;
  auto word = [&](const uint8_t* row, int mm) {
    return reinterpret_cast<const float*>(
        books + mm * book_bytes + static_cast<uint64_t>(row[mm]) * kWordBytes);
  };
  if constexpr (DSUB % 4 == 0) {
    constexpr int kLanes = lanes_for(DSUB);
    constexpr int kWords = DSUB / kLanes;
    using V = Simd<kLanes>;
    // Fully unrolled loops keep acc[] in registers (plain loops over 16 words became a memset
    // and a memcpy of an array on the stack).
    typename V::type acc[NB * kWords];
#pragma GCC unroll 32
    for (int i = 0; i < NB * kWords; ++i) {
      acc[i] = V::zero();
    }
    for (int64_t j = start; j < end; ++j) {
      if (j + kPrefetchIds < prefetch_end) {
        __builtin_prefetch(codes + static_cast<int64_t>(ids[j + kPrefetchIds]) * M);
      }
      const uint8_t* row = codes + static_cast<int64_t>(ids[j]) * M + m0;
      const typename V::type w = V::set1(WEIGHTED ? weights[j] : 1.0f);
#pragma GCC unroll 32
      for (int mm = 0; mm < NB; ++mm) {
        const float* at = word(row, mm);
#pragma GCC unroll 4
        for (int v = 0; v < kWords; ++v) {
          typename V::type& a = acc[mm * kWords + v];
          a = WEIGHTED ? V::mul_add(w, V::load(at + v * kLanes), a)
                       : V::add(a, V::load(at + v * kLanes));
        }
      }
    }
#pragma GCC unroll 32
    for (int i = 0; i < NB * kWords; ++i) {
      V::store(out + m0 * DSUB + i * kLanes, acc[i]);
    }
  } else {
    float acc[NB * DSUB] = {};
    for (int64_t j = start; j < end; ++j) {
      if (j + kPrefetchIds < prefetch_end) {
        __builtin_prefetch(codes + static_cast<int64_t>(ids[j + kPrefetchIds]) * M);
      }
      const uint8_t* row = codes + static_cast<int64_t>(ids[j]) * M + m0;
      const float w = WEIGHTED ? weights[j] : 1.0f;
      for (int mm = 0; mm < NB; ++mm) {
        const float* at = word(row, mm);
        for (int t = 0; t < DSUB; ++t) {
          acc[mm * DSUB + t] += WEIGHTED ? w * at[t] : at[t];
        }
      }
    }
    for (int t = 0; t < NB * DSUB; ++t) {
      out[m0 * DSUB + t] = acc[t];
    }
  }
}

// Pooled lookup of byte codes with a compile-time subspace width (and codebook size when
// KSUB > 0).  Every id of the range is checked first, so that code rows can be requested
// kPrefetchIds ids ahead across bag boundaries while earlier ids are pooled.
template <int DSUB, int KSUB, bool WEIGHTED, typename index_t>
int64_t pool_bags_fixed(
    const PQShape& s,
    const uint8_t* codes,
    const float* codebooks,
    const index_t* ids,
    const index_t* offsets,
    const float* weights,
    int64_t bag_begin,
    int64_t bag_end,
    float* out,
    bool check_codes) {
  if (bag_begin >= bag_end) {
    return -1;
  }
  constexpr int kNB = block_subspaces(DSUB, WEIGHTED);
  const int64_t M = s.num_subspaces;
  const int64_t range_begin = offsets[bag_begin];
  const int64_t range_end = offsets[bag_end];
  const int64_t bad = check_codes ? first_bad_code_row(s, codes, ids, range_begin, range_end)
                                  : first_bad_id(ids, s.num_rows, range_begin, range_end);
  if (bad >= 0) {
    return bad;
  }
  for (int64_t j = range_begin; j < range_end && j < range_begin + kPrefetchIds; ++j) {
    __builtin_prefetch(codes + static_cast<int64_t>(ids[j]) * M);
  }
  for (int64_t b = bag_begin; b < bag_end; ++b) {
    const int64_t start = offsets[b];
    const int64_t end = offsets[b + 1];
    float* out_row = out + b * M * DSUB;
    // The first pass over a bag's ids prefetches; later passes find the code rows in L1.
    int64_t m0 = 0;
    for (; m0 + kNB <= M; m0 += kNB) {
      pool_block<DSUB, KSUB, kNB, WEIGHTED>(
          s, codes, codebooks, ids, weights, start, end, m0 == 0 ? range_end : 0, m0, out_row);
    }
    for (; m0 < M; ++m0) {
      pool_block<DSUB, KSUB, 1, WEIGHTED>(
          s, codes, codebooks, ids, weights, start, end, m0 == 0 ? range_end : 0, m0, out_row);
    }
  }
  return -1;
}

// Any subspace width: accumulates straight into the (zeroed) output row.
template <bool WEIGHTED, typename code_t, typename index_t>
int64_t pool_bags_any(
    const PQShape& s,
    const code_t* codes,
    const float* codebooks,
    const index_t* ids,
    const index_t* offsets,
    const float* weights,
    int64_t bag_begin,
    int64_t bag_end,
    float* out,
    bool check_codes) {
  const int64_t M = s.num_subspaces;
  const int64_t dsub = s.dsub;
  for (int64_t b = bag_begin; b < bag_end; ++b) {
    const int64_t start = offsets[b];
    const int64_t end = offsets[b + 1];
    const int64_t bad = check_and_prefetch(s, codes, ids, start, end, check_codes);
    if (bad >= 0) {
      return bad;
    }
    float* out_row = out + b * M * dsub;
    for (int64_t t = 0; t < M * dsub; ++t) {
      out_row[t] = 0.0f;
    }
    for (int64_t j = start; j < end; ++j) {
      const code_t* row = codes + static_cast<int64_t>(ids[j]) * M;
      const float w = WEIGHTED ? weights[j] : 1.0f;
      for (int64_t m = 0; m < M; ++m) {
        const float* word = codebooks + (m * s.ksub + static_cast<int64_t>(row[m])) * dsub;
        float* dst = out_row + m * dsub;
        for (int64_t t = 0; t < dsub; ++t) {
          dst[t] += WEIGHTED ? w * word[t] : word[t];
        }
      }
    }
  }
  return -1;
}

template <bool WEIGHTED, typename code_t, typename index_t>
int64_t pool_bags(
    const PQShape& s,
    const code_t* codes,
    const float* codebooks,
    const index_t* ids,
    const index_t* offsets,
    const float* weights,
    int64_t bag_begin,
    int64_t bag_end,
    float* out) {
  // uint8 codes cannot exceed 255: with K = 256 they need no check.
  const bool check_codes =
      static_cast<double>(s.ksub) <= static_cast<double>(std::numeric_limits<code_t>::max());
  // Register-blocked copies for byte codes only (K <= 256, the common case): wider codes take the
  // generic loop, which keeps the number of template instances, and the build time, small.
  if constexpr (std::is_same<code_t, uint8_t>::value) {
    switch (s.dsub) {
#define TORCHREC_COMPRESS_DSUB_CASE(D)                                                         \
  case D:                                                                                      \
    return s.ksub == 256 ? pool_bags_fixed<D, 256, WEIGHTED>(                                  \
                               s, codes, codebooks, ids, offsets, weights, bag_begin, bag_end, \
                               out, check_codes)                                               \
                         : pool_bags_fixed<D, 0, WEIGHTED>(                                    \
                               s, codes, codebooks, ids, offsets, weights, bag_begin, bag_end, \
                               out, check_codes);
      TORCHREC_COMPRESS_DSUB_CASE(2)
      TORCHREC_COMPRESS_DSUB_CASE(4)
      TORCHREC_COMPRESS_DSUB_CASE(8)
      TORCHREC_COMPRESS_DSUB_CASE(16)
#undef TORCHREC_COMPRESS_DSUB_CASE
      default:
        break;
    }
  }
  return pool_bags_any<WEIGHTED>(
      s, codes, codebooks, ids, offsets, weights, bag_begin, bag_end, out, check_codes);
}

template <typename code_t, typename index_t>
int64_t pooled_lookup(
    const PQShape& s,
    const code_t* codes,
    const float* codebooks,
    const index_t* ids,
    const index_t* offsets,
    const float* weights,
    int64_t bag_begin,
    int64_t bag_end,
    float* out) {
  if (weights != nullptr) {
    return pool_bags<true>(s, codes, codebooks, ids, offsets, weights, bag_begin, bag_end, out);
  }
  return pool_bags<false>(s, codes, codebooks, ids, offsets, weights, bag_begin, bag_end, out);
}

template <typename code_t, typename index_t>
void pooled_lookup_backward(
    const PQShape& s,
    const code_t* codes,
    const index_t* ids,
    const index_t* offsets,
    const float* weights,
    int64_t num_bags,
    const float* grad_out,
    int64_t m_begin,
    int64_t m_end,
    float* grad_codebooks) {
  const int64_t M = s.num_subspaces;
  const int64_t dsub = s.dsub;
  for (int64_t b = 0; b < num_bags; ++b) {
    const float* grad_row = grad_out + b * M * dsub;
    for (int64_t j = offsets[b]; j < offsets[b + 1]; ++j) {
      const code_t* row = codes + static_cast<int64_t>(ids[j]) * M;
      const float w = weights != nullptr ? weights[j] : 1.0f;
      for (int64_t m = m_begin; m < m_end; ++m) {
        float* dst = grad_codebooks + (m * s.ksub + static_cast<int64_t>(row[m])) * dsub;
        const float* src = grad_row + m * dsub;
        for (int64_t t = 0; t < dsub; ++t) {
          dst[t] += w * src[t];
        }
      }
    }
  }
}

// Portable encoder: distances to all codewords of a subspace, then a scalar argmin.
template <typename code_t>
void encode_portable(
    const PQShape& s,
    const float* x,
    int64_t x_stride,
    const float* books_t,
    const float* norms,
    int64_t kpad,
    int64_t row_begin,
    int64_t row_end,
    code_t* codes,
    float* distances /* [kpad] scratch */) {
  const int64_t M = s.num_subspaces;
  const int64_t dsub = s.dsub;
  for (int64_t i = row_begin; i < row_end; ++i) {
    for (int64_t m = 0; m < M; ++m) {
      const float* sub = x + i * x_stride + m * dsub;
      const float* book = books_t + m * dsub * kpad;
      const float* norm = norms + m * kpad;
      for (int64_t k = 0; k < kpad; ++k) {
        distances[k] = norm[k];
      }
      for (int64_t t = 0; t < dsub; ++t) {
        const float x2 = 2.0f * sub[t];
        for (int64_t k = 0; k < kpad; ++k) {
          distances[k] -= x2 * book[t * kpad + k];
        }
      }
      int64_t best = 0;
      for (int64_t k = 1; k < s.ksub; ++k) {
        if (distances[k] < distances[best]) {
          best = k;
        }
      }
      codes[i * M + m] = static_cast<code_t>(best);
    }
  }
}

// ---- Low-rank (float factor rows) pooled lookup --------------------------------------------

// One bag of k = WORDS * LANES floats per row (ids already checked), partial sums in registers.
template <int LANES, int WORDS, bool WEIGHTED, typename index_t>
inline void pool_factor_bag(
    const float* table,
    const index_t* ids,
    const float* weights,
    int64_t start,
    int64_t end,
    int64_t prefetch_end,
    float scale,
    float* out) {
  using V = Simd<LANES>;
  constexpr int64_t k = static_cast<int64_t>(WORDS) * LANES;
  typename V::type acc[WORDS];
  for (int v = 0; v < WORDS; ++v) {
    acc[v] = V::zero();
  }
  for (int64_t j = start; j < end; ++j) {
    // A sliding window over all ids of the range (across bags): misses overlap the adds.
    if (j + kPrefetchIds < prefetch_end) {
      const float* ahead = table + static_cast<int64_t>(ids[j + kPrefetchIds]) * k;
      for (int64_t line = 0; line < k; line += 16) {
        __builtin_prefetch(ahead + line);
      }
    }
    const float* row = table + static_cast<int64_t>(ids[j]) * k;
    const typename V::type w = V::set1(WEIGHTED ? weights[j] : 1.0f);
    for (int v = 0; v < WORDS; ++v) {
      acc[v] = WEIGHTED ? V::mul_add(w, V::load(row + v * LANES), acc[v])
                        : V::add(acc[v], V::load(row + v * LANES));
    }
  }
  const typename V::type s = V::set1(scale);
  for (int v = 0; v < WORDS; ++v) {
    V::store(out + v * LANES, V::mul_add(s, acc[v], V::zero()));
  }
}

// Any k: a scalar loop straight into the output row.
template <bool WEIGHTED, typename index_t>
inline void pool_factor_bag_any(
    const float* table,
    int64_t k,
    const index_t* ids,
    const float* weights,
    int64_t start,
    int64_t end,
    float scale,
    float* out) {
  for (int64_t t = 0; t < k; ++t) {
    out[t] = 0.0f;
  }
  for (int64_t j = start; j < end; ++j) {
    const float* row = table + static_cast<int64_t>(ids[j]) * k;
    const float w = WEIGHTED ? weights[j] : 1.0f;
    for (int64_t t = 0; t < k; ++t) {
      out[t] += WEIGHTED ? w * row[t] : row[t];
    }
  }
  for (int64_t t = 0; t < k; ++t) {
    out[t] *= scale;
  }
}

template <int LANES, int WORDS, bool WEIGHTED, typename index_t>
int64_t pool_factor_bags(
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
  if (bag_begin >= bag_end) {
    return -1;
  }
  const int64_t range_end = offsets[bag_end];
  const int64_t bad = first_bad_id(ids, num_rows, offsets[bag_begin], range_end);
  if (bad >= 0) {
    return bad;
  }
  for (int64_t b = bag_begin; b < bag_end; ++b) {
    const int64_t start = offsets[b];
    const int64_t end = offsets[b + 1];
    const int64_t length = end - start;
    const float scale = mean && length > 0 ? 1.0f / static_cast<float>(length) : 1.0f;
    float* out_row = out + b * (k + 1);
    if constexpr (WORDS > 0) {
      pool_factor_bag<LANES, WORDS, WEIGHTED>(
          table, ids, weights, start, end, range_end, scale, out_row);
    } else {
      pool_factor_bag_any<WEIGHTED>(table, k, ids, weights, start, end, scale, out_row);
    }
    // The coefficient of the mean row mu: sum of weights (bag length unweighted), over L for MEAN.
    float coef = static_cast<float>(length);
    if (WEIGHTED) {
      coef = 0.0f;
      for (int64_t j = start; j < end; ++j) {
        coef += weights[j];
      }
    }
    out_row[k] = coef * scale;
  }
  return -1;
}

template <bool WEIGHTED, typename index_t>
int64_t factor_pooled_lookup_typed(
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
  // Register-blocked copies for k a multiple of the SIMD width, up to 16 words (k <= 64 with
  // 4-float words, <= 128 with 8-float ones); with AVX2, a k that is a multiple of 4 but not of 8
  // takes 4-float words; any other width takes the scalar loop.
#define TORCHREC_COMPRESS_WORDS_CASE(L, W)                                                      \
  case W:                                                                                       \
    return pool_factor_bags<L, W, WEIGHTED>(                                                    \
        table, num_rows, k, ids, offsets, weights, mean, bag_begin, bag_end, out);
#define TORCHREC_COMPRESS_WORDS_CASES(L)                                                        \
  TORCHREC_COMPRESS_WORDS_CASE(L, 1)                                                            \
  TORCHREC_COMPRESS_WORDS_CASE(L, 2)                                                            \
  TORCHREC_COMPRESS_WORDS_CASE(L, 3)                                                            \
  TORCHREC_COMPRESS_WORDS_CASE(L, 4)                                                            \
  TORCHREC_COMPRESS_WORDS_CASE(L, 5)                                                            \
  TORCHREC_COMPRESS_WORDS_CASE(L, 6)                                                            \
  TORCHREC_COMPRESS_WORDS_CASE(L, 7)                                                            \
  TORCHREC_COMPRESS_WORDS_CASE(L, 8)                                                            \
  TORCHREC_COMPRESS_WORDS_CASE(L, 9)                                                            \
  TORCHREC_COMPRESS_WORDS_CASE(L, 10)                                                           \
  TORCHREC_COMPRESS_WORDS_CASE(L, 11)                                                           \
  TORCHREC_COMPRESS_WORDS_CASE(L, 12)                                                           \
  TORCHREC_COMPRESS_WORDS_CASE(L, 13)                                                           \
  TORCHREC_COMPRESS_WORDS_CASE(L, 14)                                                           \
  TORCHREC_COMPRESS_WORDS_CASE(L, 15)                                                           \
  TORCHREC_COMPRESS_WORDS_CASE(L, 16)
  if (k % kMaxLanes == 0) {
    switch (k / kMaxLanes) {
      TORCHREC_COMPRESS_WORDS_CASES(kMaxLanes)
      default:
        break;
    }
  }
  if (kMaxLanes != 4 && k % 4 == 0) {
    switch (k / 4) {
      TORCHREC_COMPRESS_WORDS_CASES(4)
      default:
        break;
    }
  }
#undef TORCHREC_COMPRESS_WORDS_CASES
#undef TORCHREC_COMPRESS_WORDS_CASE
  return pool_factor_bags<4, 0, WEIGHTED>(
      table, num_rows, k, ids, offsets, weights, mean, bag_begin, bag_end, out);
}

template <typename index_t>
int64_t factor_pooled_lookup(
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
  if (weights != nullptr) {
    return factor_pooled_lookup_typed<true>(
        table, num_rows, k, ids, offsets, weights, mean, bag_begin, bag_end, out);
  }
  return factor_pooled_lookup_typed<false>(
      table, num_rows, k, ids, offsets, weights, mean, bag_begin, bag_end, out);
}

// ---- Row-wise int8 pooled lookup (fbgemm's fused rows) -------------------------------------

// An IEEE half as a float (exact): F16C with AVX2, bit arithmetic otherwise.
inline float half_to_float(uint16_t h) {
#ifdef TORCHREC_COMPRESS_AVX2
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1fu) {  // inf, nan
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {  // normal: rebias the exponent from 15 to 127
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else {  // zero, subnormal: mantissa * 2^-24 is exact in float
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign != 0 ? -magnitude : magnitude;
  }
  float value;
  __builtin_memcpy(&value, &bits, sizeof(value));
  return value;
#endif
}

// Values per pass over a bag's ids: 8 SIMD words of partial sums (the FMA also needs the
// broadcast scale and the widened bytes in registers).
constexpr int kInt8BlockWords = 8;


// Adds values [v0, v0 + NW * LANES) of the rows of ids [start, end) of one bag into
// out[v0 ...] (then scaled by `scale`); the bias term sum_j w_j * bias_j is added to every value.
template <int LANES, int NW, bool WEIGHTED, typename index_t>
inline void pool_int8_block(
    const uint8_t* rows,
    int64_t row_bytes,
    const index_t* ids,
    const float* weights,
    int64_t start,
    int64_t end,
    int64_t prefetch_end,
    int64_t v0,
    float scale,
    float* out) {
  using V = Simd<LANES>;
  typename V::type acc[NW];
#pragma GCC unroll 16
  for (int i = 0; i < NW; ++i) {
    acc[i] = V::zero();
  }
  float bias_sum = 0.0f;
  for (int64_t j = start; j < end; ++j) {
    if (j + kPrefetchIds < prefetch_end) {
      const uint8_t* ahead = rows + static_cast<int64_t>(ids[j + kPrefetchIds]) * row_bytes;
      for (int64_t line = 0; line < row_bytes; line += 64) {
        __builtin_prefetch(ahead + line);
      }
      __builtin_prefetch(ahead + row_bytes - 1);
    }
    const uint8_t* row = rows + static_cast<int64_t>(ids[j]) * row_bytes;
    uint16_t qparams[2];
    __builtin_memcpy(qparams, row, sizeof(qparams));
    const float w = WEIGHTED ? weights[j] : 1.0f;
    const typename V::type row_scale = V::set1(w * half_to_float(qparams[0]));
    bias_sum += w * half_to_float(qparams[1]);
    const uint8_t* values = row + 4 + v0;
#pragma GCC unroll 16
    for (int i = 0; i < NW; ++i) {
      acc[i] = V::mul_add(row_scale, V::load_bytes(values + i * LANES), acc[i]);
    }
  }
  const typename V::type bias = V::set1(bias_sum);
  const typename V::type s = V::set1(scale);
#pragma GCC unroll 16
  for (int i = 0; i < NW; ++i) {
    V::store(out + v0 + i * LANES, V::mul_add(s, V::add(acc[i], bias), V::zero()));
  }
}

template <bool WEIGHTED, typename index_t>
int64_t pool_int8_bags(
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
  if (bag_begin >= bag_end) {
    return -1;
  }
  constexpr int kLanes = kMaxLanes;
  constexpr int64_t kBlock = kInt8BlockWords * kLanes;
  const int64_t range_end = offsets[bag_end];
  const int64_t bad = first_bad_id(ids, num_rows, offsets[bag_begin], range_end);
  if (bad >= 0) {
    return bad;
  }
  for (int64_t b = bag_begin; b < bag_end; ++b) {
    const int64_t start = offsets[b];
    const int64_t end = offsets[b + 1];
    const float scale = mean && end > start ? 1.0f / static_cast<float>(end - start) : 1.0f;
    float* out_row = out + b * dim;
    // The first pass over a bag's ids prefetches; later passes find the rows in L1.
    int64_t v0 = 0;
    for (; v0 + kBlock <= dim; v0 += kBlock) {
      pool_int8_block<kLanes, kInt8BlockWords, WEIGHTED>(
          rows, row_bytes, ids, weights, start, end, v0 == 0 ? range_end : 0, v0, scale, out_row);
    }
    for (; v0 + kLanes <= dim; v0 += kLanes) {
      pool_int8_block<kLanes, 1, WEIGHTED>(
          rows, row_bytes, ids, weights, start, end, v0 == 0 ? range_end : 0, v0, scale, out_row);
    }
    for (; v0 < dim; ++v0) {  // a width that is not a multiple of the SIMD word
      float sum = 0.0f;
      for (int64_t j = start; j < end; ++j) {
        const uint8_t* row = rows + static_cast<int64_t>(ids[j]) * row_bytes;
        uint16_t qparams[2];
        __builtin_memcpy(qparams, row, sizeof(qparams));
        const float w = WEIGHTED ? weights[j] : 1.0f;
        sum += w * (half_to_float(qparams[0]) * static_cast<float>(row[4 + v0]) +
                    half_to_float(qparams[1]));
      }
      out_row[v0] = sum * scale;
    }
  }
  return -1;
}

template <typename index_t>
int64_t int8_pooled_lookup(
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
  if (weights != nullptr) {
    return pool_int8_bags<true>(
        rows, num_rows, row_bytes, dim, ids, offsets, weights, mean, bag_begin, bag_end, out);
  }
  return pool_int8_bags<false>(
      rows, num_rows, row_bytes, dim, ids, offsets, weights, mean, bag_begin, bag_end, out);
}
