// Kernel bodies, written once over a small SIMD-word abstraction (Simd<4> = SSE, Simd<8> = AVX2).
// pq_kernels.cpp includes this file once per instruction set, inside a namespace and a
// `#pragma GCC target` region (TORCHREC_COMPRESS_AVX2 defined for the AVX2 copy), so the same
// source yields an x86-64-v2 and an AVX2 copy.  Only headers already included by pq_kernels.cpp
// may be used here (a target pragma must not wrap standard headers).


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

// Adds the codewords of subspaces [m0, m0 + NB) of every id of one bag into out[m0 * DSUB...].
template <int DSUB, int NB, bool WEIGHTED, typename code_t, typename index_t>
inline void pool_block(
    const PQShape& s,
    const code_t* codes,
    const float* codebooks,
    const index_t* ids,
    const float* weights,
    int64_t start,
    int64_t end,
    int64_t m0,
    float* out) {
  float acc[NB * DSUB] = {};
  const float* books = codebooks + m0 * s.ksub * DSUB;
  for (int64_t j = start; j < end; ++j) {
    const code_t* row = codes + static_cast<int64_t>(ids[j]) * s.num_subspaces + m0;
    const float w = WEIGHTED ? weights[j] : 1.0f;
    for (int mm = 0; mm < NB; ++mm) {
      const float* word = books + (mm * s.ksub + static_cast<int64_t>(row[mm])) * DSUB;
      for (int t = 0; t < DSUB; ++t) {
        if (WEIGHTED) {
          acc[mm * DSUB + t] += w * word[t];
        } else {
          acc[mm * DSUB + t] += word[t];
        }
      }
    }
  }
  for (int t = 0; t < NB * DSUB; ++t) {
    out[m0 * DSUB + t] = acc[t];
  }
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
};
constexpr int kMaxLanes = 8;
#else
constexpr int kMaxLanes = 4;
#endif

// Floats per SIMD word for a subspace width, and subspaces per block: a block's partial sums fill
// 8 SIMD registers (half the register file), so they never leave registers while a bag's ids
// stream past.
constexpr int lanes_for(int dsub) {
  return dsub % kMaxLanes == 0 ? kMaxLanes : 4;
}
constexpr int block_subspaces(int dsub) {
  return dsub % 4 == 0 ? (8 * lanes_for(dsub) / dsub > 0 ? 8 * lanes_for(dsub) / dsub : 1)
                       : 32 / dsub;
}

// pool_block for DSUB a multiple of 4: DSUB / LANES SIMD words per codeword.
template <int DSUB, int NB, bool WEIGHTED, typename code_t, typename index_t>
inline void pool_block_simd(
    const PQShape& s,
    const code_t* codes,
    const float* codebooks,
    const index_t* ids,
    const float* weights,
    int64_t start,
    int64_t end,
    int64_t m0,
    float* out) {
  constexpr int kLanes = lanes_for(DSUB);
  constexpr int kWords = DSUB / kLanes;
  using V = Simd<kLanes>;
  typename V::type acc[NB * kWords];
  for (int i = 0; i < NB * kWords; ++i) {
    acc[i] = V::zero();
  }
  const float* books = codebooks + m0 * s.ksub * DSUB;
  const int64_t stride = s.ksub * DSUB;
  for (int64_t j = start; j < end; ++j) {
    const code_t* row = codes + static_cast<int64_t>(ids[j]) * s.num_subspaces + m0;
    const typename V::type w = V::set1(WEIGHTED ? weights[j] : 1.0f);
    for (int mm = 0; mm < NB; ++mm) {
      const float* word = books + mm * stride + static_cast<int64_t>(row[mm]) * DSUB;
      for (int v = 0; v < kWords; ++v) {
        typename V::type& a = acc[mm * kWords + v];
        a = WEIGHTED ? V::mul_add(w, V::load(word + v * kLanes), a)
                     : V::add(a, V::load(word + v * kLanes));
      }
    }
  }
  for (int i = 0; i < NB * kWords; ++i) {
    V::store(out + m0 * DSUB + i * kLanes, acc[i]);
  }
}

// Pooled lookup with a compile-time subspace width: subspaces go in blocks of kBlockFloats floats.
template <int DSUB, bool WEIGHTED, typename code_t, typename index_t>
int64_t pool_bags_fixed(
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
  constexpr int kNB = block_subspaces(DSUB);
  const int64_t M = s.num_subspaces;
  const int64_t row_floats = M * DSUB;
  int64_t bad = check_and_prefetch(
      s, codes, ids, offsets[bag_begin], offsets[bag_end > bag_begin ? bag_begin + 1 : bag_begin],
      check_codes);
  for (int64_t b = bag_begin; b < bag_end && bad < 0; ++b) {
    const int64_t start = offsets[b];
    const int64_t end = offsets[b + 1];
    // The next bag's rows are requested now, so that their cache misses overlap this bag's work.
    if (b + 1 < bag_end) {
      bad = check_and_prefetch(s, codes, ids, end, offsets[b + 2], check_codes);
    }
    float* out_row = out + b * row_floats;
    int64_t m0 = 0;
    for (; m0 + kNB <= M; m0 += kNB) {
      if constexpr (DSUB % 4 == 0) {
        pool_block_simd<DSUB, kNB, WEIGHTED>(
            s, codes, codebooks, ids, weights, start, end, m0, out_row);
      } else {
        pool_block<DSUB, kNB, WEIGHTED>(
            s, codes, codebooks, ids, weights, start, end, m0, out_row);
      }
    }
    for (; m0 < M; ++m0) {
      if constexpr (DSUB % 4 == 0) {
        pool_block_simd<DSUB, 1, WEIGHTED>(
            s, codes, codebooks, ids, weights, start, end, m0, out_row);
      } else {
        pool_block<DSUB, 1, WEIGHTED>(s, codes, codebooks, ids, weights, start, end, m0, out_row);
      }
    }
  }
  return bad;
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
  if constexpr (!std::is_same<code_t, uint8_t>::value) {
    return pool_bags_any<WEIGHTED>(
        s, codes, codebooks, ids, offsets, weights, bag_begin, bag_end, out, check_codes);
  } else {
    switch (s.dsub) {
#define TORCHREC_COMPRESS_DSUB_CASE(D)                                                         \
  case D:                                                                                      \
    return pool_bags_fixed<D, WEIGHTED>(                                                       \
        s, codes, codebooks, ids, offsets, weights, bag_begin, bag_end, out, check_codes);
    TORCHREC_COMPRESS_DSUB_CASE(2)
    TORCHREC_COMPRESS_DSUB_CASE(4)
    TORCHREC_COMPRESS_DSUB_CASE(8)
    TORCHREC_COMPRESS_DSUB_CASE(16)
#undef TORCHREC_COMPRESS_DSUB_CASE
    default:
        return pool_bags_any<WEIGHTED>(
            s, codes, codebooks, ids, offsets, weights, bag_begin, bag_end, out, check_codes);
    }
  }
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

// Ids ahead of the one being added whose rows are requested from memory.
constexpr int64_t kPrefetchIds = 32;

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
