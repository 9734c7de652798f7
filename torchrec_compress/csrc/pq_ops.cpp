// The torchrec_compress operator library: schemas (TORCH_LIBRARY), CPU implementations that check
// their inputs and split work over threads, and the Python module stub that loads it all.
// Autograd and fake (meta) implementations are registered from Python
// (torchrec_compress/pq/_ops.py).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <string>

#include "pq_kernels.h"

namespace torchrec_compress {
namespace {

// Instruction set used by the kernels; tests force the portable one to cover both copies.
std::atomic<int> g_isa{static_cast<int>(best_isa())};

Isa current_isa() {
  return static_cast<Isa>(g_isa.load());
}

std::string isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "generic";
}

std::string pq_kernel_isa() {
  return isa_name(current_isa());
}

std::string pq_set_kernel_isa(const std::string& name) {
  if (name == "auto") {
    g_isa.store(static_cast<int>(best_isa()));
  } else if (name == "generic") {
    g_isa.store(static_cast<int>(Isa::kGeneric));
  } else if (name == "avx2") {
    TORCH_CHECK(best_isa() >= Isa::kAvx2, "pq_set_kernel_isa: this CPU lacks AVX2/FMA");
    g_isa.store(static_cast<int>(Isa::kAvx2));
  } else if (name == "avx512") {
    TORCH_CHECK(best_isa() >= Isa::kAvx512, "pq_set_kernel_isa: this CPU lacks AVX-512");
    g_isa.store(static_cast<int>(Isa::kAvx512));
  } else {
    TORCH_CHECK(
        false, "pq_set_kernel_isa: expected 'auto', 'generic', 'avx2' or 'avx512', got '", name,
        "'");
  }
  return pq_kernel_isa();
}

// Work (code lookups) per thread below which splitting costs more than it saves.
constexpr int64_t kMinLookupsPerTask = 16384;

int64_t grain_for(int64_t items, int64_t work) {
  return std::max<int64_t>(1, items * kMinLookupsPerTask / std::max<int64_t>(work, 1));
}

void check_codes_and_books(const at::Tensor& codes, const at::Tensor& codebooks, const char* op) {
  TORCH_CHECK(codes.device().is_cpu() && codebooks.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(
      codes.dim() == 2 &&
          (codes.scalar_type() == at::kByte || codes.scalar_type() == at::kShort ||
           codes.scalar_type() == at::kInt),
      op, ": codes must be [N, M] uint8, int16 or int32, got ", codes.sizes(), " ",
      codes.scalar_type());
  TORCH_CHECK(
      codebooks.dim() == 3 && codebooks.scalar_type() == at::kFloat &&
          codebooks.size(0) == codes.size(1),
      op, ": codebooks must be float32 [M=", codes.size(1), ", K, dsub], got ",
      codebooks.sizes(), " ", codebooks.scalar_type());
}

// ids [n] and offsets [B + 1] (non-decreasing, within [0, n]) in one integer dtype.
at::Tensor checked_offsets(const at::Tensor& ids, const at::Tensor& offsets, const char* op) {
  TORCH_CHECK(
      ids.dim() == 1 && (ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong), op,
      ": ids must be 1-D int32 or int64, got ", ids.sizes(), " ", ids.scalar_type());
  TORCH_CHECK(
      offsets.dim() == 1 && offsets.numel() >= 1 &&
          (offsets.scalar_type() == at::kInt || offsets.scalar_type() == at::kLong),
      op, ": offsets must be 1-D int32 or int64 with B + 1 >= 1 entries, got ", offsets.sizes());
  at::Tensor result = offsets.to(ids.scalar_type()).contiguous();
  const int64_t n = ids.numel();
  AT_DISPATCH_INDEX_TYPES(result.scalar_type(), "checked_offsets", [&] {
    const index_t* o = result.const_data_ptr<index_t>();
    TORCH_CHECK(
        o[0] >= 0 && o[result.numel() - 1] <= n, op, ": offsets must lie in [0, ", n,
        "], got first ", o[0], " and last ", o[result.numel() - 1]);
    for (int64_t b = 0; b + 1 < result.numel(); ++b) {
      TORCH_CHECK(
          o[b] <= o[b + 1], op, ": offsets must be non-decreasing, got ", o[b], " then ",
          o[b + 1], " at bag ", b);
    }
  });
  return result;
}

const float* checked_weights(
    const std::optional<at::Tensor>& weights, at::Tensor& holder, int64_t n, const char* op) {
  if (!weights.has_value()) {
    return nullptr;
  }
  TORCH_CHECK(
      weights->dim() == 1 && weights->numel() == n && weights->scalar_type() == at::kFloat, op,
      ": per_sample_weights must be float32 [", n, "], got ", weights->sizes(), " ",
      weights->scalar_type());
  holder = weights->contiguous();
  return holder.const_data_ptr<float>();
}

// Threads report the first invalid id position of their range (or -1); the smallest one wins,
// so the error names the same id whatever the split.
void keep_first_bad(std::atomic<int64_t>& first_bad, int64_t bad) {
  if (bad < 0) {
    return;
  }
  int64_t seen = first_bad.load();
  while (bad < seen && !first_bad.compare_exchange_weak(seen, bad)) {
  }
}

#define TORCHREC_COMPRESS_DISPATCH_CODES(TYPE, NAME, ...)                        \
  AT_DISPATCH_SWITCH(                                                            \
      TYPE, NAME, AT_DISPATCH_CASE(at::kByte, __VA_ARGS__)                       \
                      AT_DISPATCH_CASE(at::kShort, __VA_ARGS__)                  \
                          AT_DISPATCH_CASE(at::kInt, __VA_ARGS__))

at::Tensor pq_pooled_lookup(
    const at::Tensor& codes_in,
    const at::Tensor& codebooks_in,
    const at::Tensor& ids_in,
    const at::Tensor& offsets_in,
    const std::optional<at::Tensor>& per_sample_weights) {
  constexpr const char* op = "pq_pooled_lookup";
  check_codes_and_books(codes_in, codebooks_in, op);
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor codebooks = codebooks_in.contiguous();
  const at::Tensor ids = ids_in.contiguous();
  const at::Tensor offsets = checked_offsets(ids, offsets_in, op);
  at::Tensor weights_holder;
  const float* weights = checked_weights(per_sample_weights, weights_holder, ids.numel(), op);
  const PQShape shape{codes.size(0), codes.size(1), codebooks.size(1), codebooks.size(2)};
  const int64_t num_bags = offsets.numel() - 1;
  at::Tensor out = at::empty({num_bags, shape.num_subspaces * shape.dsub}, codebooks.options());
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  const Isa isa = current_isa();
  TORCHREC_COMPRESS_DISPATCH_CODES(codes.scalar_type(), op, [&] {
    using code_t = scalar_t;
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), op, [&] {
      const int64_t grain = grain_for(num_bags, ids.numel() * shape.num_subspaces);
      at::parallel_for(0, num_bags, grain, [&](int64_t begin, int64_t end) {
        const int64_t bad = pooled_lookup<code_t, index_t>(
            isa, shape, codes.const_data_ptr<code_t>(), codebooks.const_data_ptr<float>(),
            ids.const_data_ptr<index_t>(), offsets.const_data_ptr<index_t>(), weights, begin,
            end, out.mutable_data_ptr<float>());
        keep_first_bad(first_bad, bad);
      });
    });
  });
  const int64_t bad = first_bad.load();
  TORCH_CHECK(
      bad == std::numeric_limits<int64_t>::max(), op, ": id ", ids[bad].item<int64_t>(),
      " at position ", bad, " is outside [0, ", shape.num_rows, ") or its codes are outside [0, ",
      shape.ksub, ")");
  return out;
}

at::Tensor pq_pooled_lookup_backward(
    const at::Tensor& grad_in,
    const at::Tensor& codes_in,
    const at::Tensor& ids_in,
    const at::Tensor& offsets_in,
    const std::optional<at::Tensor>& per_sample_weights,
    int64_t ksub) {
  constexpr const char* op = "pq_pooled_lookup_backward";
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor ids = ids_in.contiguous();
  const at::Tensor offsets = checked_offsets(ids, offsets_in, op);
  at::Tensor weights_holder;
  const float* weights = checked_weights(per_sample_weights, weights_holder, ids.numel(), op);
  const int64_t num_bags = offsets.numel() - 1;
  const int64_t num_subspaces = codes.size(1);
  TORCH_CHECK(
      grad_in.dim() == 2 && grad_in.size(0) == num_bags && num_subspaces > 0 &&
          grad_in.size(1) % num_subspaces == 0 && grad_in.scalar_type() == at::kFloat,
      op, ": grad must be float32 [", num_bags, ", M * dsub] with M=", num_subspaces, ", got ",
      grad_in.sizes());
  const at::Tensor grad = grad_in.contiguous();
  const PQShape shape{codes.size(0), num_subspaces, ksub, grad.size(1) / num_subspaces};
  at::Tensor grad_books = at::zeros({num_subspaces, ksub, shape.dsub}, grad.options());
  const Isa isa = current_isa();
  TORCHREC_COMPRESS_DISPATCH_CODES(codes.scalar_type(), op, [&] {
    using code_t = scalar_t;
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), op, [&] {
      // Threads own disjoint subspaces: no atomics, and a fixed summation order.
      const int64_t grain = grain_for(num_subspaces, ids.numel() * num_subspaces);
      at::parallel_for(0, num_subspaces, grain, [&](int64_t begin, int64_t end) {
        pooled_lookup_backward<code_t, index_t>(
            isa, shape, codes.const_data_ptr<code_t>(), ids.const_data_ptr<index_t>(),
            offsets.const_data_ptr<index_t>(), weights, num_bags, grad.const_data_ptr<float>(),
            begin, end, grad_books.mutable_data_ptr<float>());
      });
    });
  });
  return grad_books;
}

at::Tensor lowrank_pooled_lookup(
    const at::Tensor& table_in,
    const at::Tensor& ids_in,
    const at::Tensor& offsets_in,
    const std::optional<at::Tensor>& per_sample_weights,
    bool mean) {
  constexpr const char* op = "lowrank_pooled_lookup";
  TORCH_CHECK(table_in.device().is_cpu() && ids_in.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(
      table_in.dim() == 2 && table_in.scalar_type() == at::kFloat, op,
      ": table must be float32 [N, k], got ", table_in.sizes(), " ", table_in.scalar_type());
  const at::Tensor table = table_in.contiguous();
  const at::Tensor ids = ids_in.contiguous();
  const at::Tensor offsets = checked_offsets(ids, offsets_in, op);
  at::Tensor weights_holder;
  const float* weights = checked_weights(per_sample_weights, weights_holder, ids.numel(), op);
  const int64_t num_rows = table.size(0);
  const int64_t k = table.size(1);
  const int64_t num_bags = offsets.numel() - 1;
  at::Tensor out = at::empty({num_bags, k + 1}, table.options());
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  const Isa isa = current_isa();
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), op, [&] {
    // one row of k floats is worth k / 8 code lookups of the PQ kernel's grain
    const int64_t grain = grain_for(num_bags, ids.numel() * std::max<int64_t>(k / 8, 1));
    at::parallel_for(0, num_bags, grain, [&](int64_t begin, int64_t end) {
      const int64_t bad = factor_pooled_lookup<index_t>(
          isa, table.const_data_ptr<float>(), num_rows, k, ids.const_data_ptr<index_t>(),
          offsets.const_data_ptr<index_t>(), weights, mean, begin, end,
          out.mutable_data_ptr<float>());
      keep_first_bad(first_bad, bad);
    });
  });
  const int64_t bad = first_bad.load();
  TORCH_CHECK(
      bad == std::numeric_limits<int64_t>::max(), op, ": id ", ids[bad].item<int64_t>(),
      " at position ", bad, " is outside [0, ", num_rows, ")");
  return out;
}

at::Tensor int8_pooled_lookup_op(
    const at::Tensor& rows_in,
    int64_t dim,
    const at::Tensor& ids_in,
    const at::Tensor& offsets_in,
    const std::optional<at::Tensor>& per_sample_weights,
    bool mean) {
  constexpr const char* op = "int8_pooled_lookup";
  TORCH_CHECK(rows_in.device().is_cpu() && ids_in.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(
      rows_in.dim() == 2 && rows_in.scalar_type() == at::kByte && dim >= 0 &&
          rows_in.size(1) >= dim + 4,
      op, ": rows must be uint8 [N, >= dim + 4] (fp16 scale, fp16 bias, dim values) with dim=",
      dim, ", got ", rows_in.sizes(), " ", rows_in.scalar_type());
  // Rows only need unit inner stride: fbgemm's per-table views of its buffer are read in place.
  const at::Tensor rows = rows_in.stride(1) == 1 ? rows_in : rows_in.contiguous();
  const at::Tensor ids = ids_in.contiguous();
  const at::Tensor offsets = checked_offsets(ids, offsets_in, op);
  at::Tensor weights_holder;
  const float* weights = checked_weights(per_sample_weights, weights_holder, ids.numel(), op);
  const int64_t num_rows = rows.size(0);
  const int64_t num_bags = offsets.numel() - 1;
  at::Tensor out = at::empty({num_bags, dim}, rows.options().dtype(at::kFloat));
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  const Isa isa = current_isa();
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), op, [&] {
    // one row of dim bytes is worth dim / 32 code lookups of the PQ kernel's grain
    const int64_t grain = grain_for(num_bags, ids.numel() * std::max<int64_t>(dim / 32, 1));
    at::parallel_for(0, num_bags, grain, [&](int64_t begin, int64_t end) {
      const int64_t bad = int8_pooled_lookup<index_t>(
          isa, rows.const_data_ptr<uint8_t>(), num_rows, rows.stride(0), dim,
          ids.const_data_ptr<index_t>(), offsets.const_data_ptr<index_t>(), weights, mean, begin,
          end, out.mutable_data_ptr<float>());
      keep_first_bad(first_bad, bad);
    });
  });
  const int64_t bad = first_bad.load();
  TORCH_CHECK(
      bad == std::numeric_limits<int64_t>::max(), op, ": id ", ids[bad].item<int64_t>(),
      " at position ", bad, " is outside [0, ", num_rows, ")");
  return out;
}

at::Tensor pq_encode(const at::Tensor& x, const at::Tensor& codebooks_in, at::ScalarType dtype) {
  constexpr const char* op = "pq_encode";
  TORCH_CHECK(x.device().is_cpu() && codebooks_in.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(
      codebooks_in.dim() == 3 && codebooks_in.scalar_type() == at::kFloat, op,
      ": codebooks must be float32 [M, K, dsub], got ", codebooks_in.sizes(), " ",
      codebooks_in.scalar_type());
  const int64_t num_subspaces = codebooks_in.size(0);
  const int64_t ksub = codebooks_in.size(1);
  const int64_t dsub = codebooks_in.size(2);
  TORCH_CHECK(
      x.dim() == 2 && x.size(1) == num_subspaces * dsub && x.scalar_type() == at::kFloat, op,
      ": x must be float32 [n, ", num_subspaces * dsub, "], got ", x.sizes(), " ",
      x.scalar_type());
  TORCH_CHECK(ksub >= 1, op, ": codebooks need at least one codeword per subspace");
  TORCH_CHECK(
      dtype == at::kByte || dtype == at::kShort || dtype == at::kInt, op,
      ": codes dtype must be uint8, int16 or int32, got ", dtype);
  // Rows only need a unit inner stride: chunks of a larger table are encoded without a copy.
  const at::Tensor rows = x.stride(1) == 1 ? x : x.contiguous();
  const Isa isa = current_isa();
  const int64_t kpad = encode_kpad(isa, ksub);
  // [M, dsub, kpad]: codeword coordinate t of 8 (16) consecutive codewords is one vector load.
  at::Tensor books_t = at::zeros({num_subspaces, dsub, kpad}, codebooks_in.options());
  books_t.narrow(2, 0, ksub).copy_(codebooks_in.transpose(1, 2));
  at::Tensor norms = at::full(
      {num_subspaces, kpad}, std::numeric_limits<float>::infinity(), codebooks_in.options());
  norms.narrow(1, 0, ksub).copy_(codebooks_in.pow(2).sum(-1));
  const PQShape shape{rows.size(0), num_subspaces, ksub, dsub};
  at::Tensor codes = at::empty({rows.size(0), num_subspaces}, x.options().dtype(dtype));
  TORCHREC_COMPRESS_DISPATCH_CODES(dtype, op, [&] {
    at::parallel_for(0, rows.size(0), 256, [&](int64_t begin, int64_t end) {
      encode<scalar_t>(
          isa, shape, rows.const_data_ptr<float>(), rows.stride(0), books_t.const_data_ptr<float>(),
          norms.const_data_ptr<float>(), kpad, begin, end, codes.mutable_data_ptr<scalar_t>());
    });
  });
  return codes;
}

}  // namespace

TORCH_LIBRARY(torchrec_compress, m) {
  m.def(
      "pq_pooled_lookup(Tensor codes, Tensor codebooks, Tensor ids, Tensor offsets, "
      "Tensor? per_sample_weights=None) -> Tensor");
  m.def(
      "pq_pooled_lookup_backward(Tensor grad, Tensor codes, Tensor ids, Tensor offsets, "
      "Tensor? per_sample_weights, int ksub) -> Tensor");
  m.def("pq_encode(Tensor x, Tensor codebooks, ScalarType dtype) -> Tensor");
  m.def(
      "lowrank_pooled_lookup(Tensor table, Tensor ids, Tensor offsets, "
      "Tensor? per_sample_weights=None, bool mean=False) -> Tensor");
  m.def(
      "int8_pooled_lookup(Tensor rows, int dim, Tensor ids, Tensor offsets, "
      "Tensor? per_sample_weights=None, bool mean=False) -> Tensor");
  m.def("pq_kernel_isa() -> str", &pq_kernel_isa);
  m.def("pq_set_kernel_isa(str isa) -> str", &pq_set_kernel_isa);
}

TORCH_LIBRARY_IMPL(torchrec_compress, CPU, m) {
  m.impl("pq_pooled_lookup", &pq_pooled_lookup);
  m.impl("pq_pooled_lookup_backward", &pq_pooled_lookup_backward);
  m.impl("pq_encode", &pq_encode);
  m.impl("lowrank_pooled_lookup", &lowrank_pooled_lookup);
  m.impl("int8_pooled_lookup", &int8_pooled_lookup_op);
}

}  // namespace torchrec_compress

// `import torchrec_compress._C` loads this library, which registers the operators above.
extern "C" PyObject* PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
