// Product-quantization CPU kernels on raw pointers, free of torch headers so that they compile in
// seconds.  Each kernel handles one contiguous range of work (bags, subspaces or rows); the
// callers in pq_ops.cpp split the ranges over threads with at::parallel_for.  Every kernel exists
// for two instruction sets, chosen once at runtime: x86-64-v2 (the build's baseline) and
// AVX2 + FMA + F16C (x86-64-v3), so one wheel is fast on new machines and still loads on old ones;
// the encoder has a third, AVX-512 F/BW/DQ/VL (x86-64-v4).
#pragma once

#include <cstdint>

namespace torchrec_compress {

// kAvx512 (AVX-512 F/BW/DQ/VL on top of kAvx2) has its own encoder; its other kernels are the
// AVX2 ones.
enum class Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

// The best instruction set this CPU runs (kAvx2 needs AVX2, FMA and F16C).
Isa best_isa();

// The codebook padding `encode` needs on `isa`: ksub rounded up to its vector width.
int64_t encode_kpad(Isa isa, int64_t ksub);

// Shapes shared by every kernel: a table of `num_rows` rows coded on `num_subspaces` subspaces of
// `ksub` codewords of `dsub` floats.
struct PQShape {
  int64_t num_rows;
  int64_t num_subspaces;
  int64_t ksub;
  int64_t dsub;
};

// Sum-pools bags [bag_begin, bag_end): out[b] = sum_{j in bag b} w_j * decode(codes[ids[j]]).
// `codebooks` is [M, K, dsub] contiguous, `offsets` has B + 1 entries, `weights` may be null,
// `out` rows are M * dsub floats.  Returns -1 on success, otherwise the position in `ids` of the
// first id outside [0, num_rows) or whose code is outside [0, ksub); nothing is read out of range.
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
    float* out);

// Codebook gradient of pooled_lookup for subspaces [m_begin, m_end):
// grad_codebooks[m, codes[ids[j], m]] += w_j * grad_out[b, m * dsub : (m + 1) * dsub] for every
// id j of every bag b.  Each call owns its subspaces, so calls on disjoint ranges never race and
// the sum order is fixed (deterministic gradients).  Ids and codes must have passed the forward.
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
    float* grad_codebooks);

// Nearest codeword per subspace for rows [row_begin, row_end) of x ([n, M * dsub], row stride
// `x_stride` floats): codes[i, m] = argmin_k ||c_mk||^2 - 2 x_im . c_mk (first k on ties).
// `books_t` is the codebooks transposed to [M, dsub, kpad] and `norms` is [M, kpad] with
// +inf in the padding (kpad = encode_kpad(isa, ksub)).
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
    code_t* codes);

// Low-rank pooling of bags [bag_begin, bag_end) over a float factor table ([num_rows, k]
// contiguous): out row b ([k + 1] floats) = [s_b * sum_{j in bag b} w_j * table[ids[j]], s_b * c_b]
// with c_b = sum of w_j (the bag length when `weights` is null) and s_b = 1 / length for `mean`
// (1 for SUM and for empty bags).  The last column is the coefficient of the mean row mu, so one
// GEMM with [B; mu] ([k + 1, d]) finishes the low-rank lookup.  Returns -1 on success, otherwise
// the position in `ids` of the first id outside [0, num_rows) (nothing is read out of range).
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
    float* out);

// Row-wise int8 pooling of bags [bag_begin, bag_end) over fbgemm's fused n-bit rows (what
// TorchRec's quantized EmbeddingBagCollection stores): row i is `row_bytes` bytes, an fp16 scale
// and an fp16 bias, then `dim` uint8 values q (then padding); value t is scale * q_t + bias.
// out row b ([dim] floats) = s_b * sum_{j in bag b} w_j * value(ids[j]), s_b = 1 / length for
// `mean` (1 for SUM and for empty bags).  Returns -1 on success, otherwise the position in `ids`
// of the first id outside [0, num_rows) (nothing is read out of range).
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
    float* out);

}  // namespace torchrec_compress
