// advise_huge_pages: backs a tensor's storage with 2 MiB pages in place, where the OS allows it.
//
// Pooled lookups touch one or two cache lines of a random row per id; with 4 KiB pages nearly
// every id of a multi-GiB table also misses the TLB, which costs a quarter to a third of the
// lookup time.  Collapsing the storage into transparent huge pages keeps its addresses, so every
// view of it (fbgemm's per-table weight views, state-dict views) stays valid and no copy of the
// table is made.  Linux only: madvise(MADV_HUGEPAGE) marks the range, MADV_COLLAPSE (Linux 6.1)
// moves its pages into huge pages now instead of whenever khugepaged gets to them.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace torchrec_compress {
namespace {

#if defined(__linux__)
constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
constexpr uintptr_t kCollapsePiece = uintptr_t{64} << 20;

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif

// Bytes of the 2 MiB-aligned part of `t`'s storage that are now in huge pages, and why the rest
// is not ("" when all of it is, or when the storage holds no aligned 2 MiB range).
std::tuple<int64_t, std::string> advise_huge_pages(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "advise_huge_pages: CPU tensors only, got ", t.device());
  if (!t.has_storage() || t.storage().data() == nullptr) {
    return {0, ""};
  }
  const auto begin = reinterpret_cast<uintptr_t>(t.storage().data());
  const uintptr_t end = begin + t.storage().nbytes();
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = end & ~(kHugePage - 1);
  if (last <= first) {
    return {0, ""};
  }
  if (madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE) != 0) {
    return {0, std::string("madvise(MADV_HUGEPAGE): ") + std::strerror(errno)};
  }
  // Synchronous and non-destructive: the data stays where it is, in new 2 MiB pages.  Done in
  // pieces, so that a piece the kernel cannot collapse (EAGAIN: a transient failure, retried;
  // ENOMEM: no free 2 MiB page) costs that piece only.
  int64_t collapsed = 0;
  std::string reason;
  for (uintptr_t piece = first; piece < last; piece += kCollapsePiece) {
    const size_t length = last - piece < kCollapsePiece ? last - piece : kCollapsePiece;
    int result = -1;
    for (int attempt = 0; attempt < 3 && result != 0; ++attempt) {
      result = madvise(reinterpret_cast<void*>(piece), length, MADV_COLLAPSE);
      if (result != 0 && errno != EAGAIN) {
        break;
      }
    }
    if (result == 0) {
      collapsed += static_cast<int64_t>(length);
    } else if (reason.empty()) {
      reason = std::string("madvise(MADV_COLLAPSE): ") + std::strerror(errno);
    }
  }
  return {collapsed, reason};
}
#else
std::tuple<int64_t, std::string> advise_huge_pages(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "advise_huge_pages: CPU tensors only, got ", t.device());
  return {0, "transparent huge pages are a Linux feature"};
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchrec_compress, m) {
  m.def("advise_huge_pages(Tensor tensor) -> (int, str)", &advise_huge_pages);
}

}  // namespace torchrec_compress
