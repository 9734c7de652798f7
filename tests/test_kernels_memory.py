"""Huge-page backing of large tensors (``torchrec_compress.kernels``): values never change."""

import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from torchrec_compress import kernels
from torchrec_compress.kernels import advise_huge_pages, huge_pages_unavailable, use_huge_pages_

needs_huge_pages = pytest.mark.skipif(
    huge_pages_unavailable() is not None, reason=f"{huge_pages_unavailable()}"
)


def _anon_huge_bytes(tensor: torch.Tensor) -> int:
    """AnonHugePages of the mappings overlapping ``tensor``'s storage (``/proc/self/smaps``)."""
    begin = tensor.untyped_storage().data_ptr()
    end = begin + tensor.untyped_storage().nbytes()
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: "start-end perms ..."
            low, high = (int(x, 16) for x in head.split("-"))
            inside = low < end and high > begin
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1]) * 1024
    return total


@needs_huge_pages
def test_advise_huge_pages_keeps_values_and_backs_the_aligned_range() -> None:
    table = torch.randn(24 << 20 // 4, generator=torch.Generator().manual_seed(0))  # 24 MiB
    view = table.view(-1, 64)[::3]  # any view of the storage will do
    expected = table.clone()
    address = table.data_ptr()
    advised = advise_huge_pages(view)
    assert table.data_ptr() == address
    assert torch.equal(table, expected)
    # all of it but the partial 2 MiB pages at both ends, or less where the kernel had none free
    assert 0 <= advised <= table.numel() * 4
    if advised:
        assert _anon_huge_bytes(table) >= advised


def test_tensors_without_a_whole_huge_page_are_left_alone() -> None:
    small = torch.arange(1000.0)
    assert advise_huge_pages(small) == 0
    assert torch.equal(small, torch.arange(1000.0))
    assert advise_huge_pages(torch.empty(0)) == 0


def test_unavailable_platform_or_setting_changes_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    table = torch.randn(3 << 20)
    before = table.clone()
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(kernels, "THP_SETTING", setting)
    with caplog.at_level(logging.INFO, logger="torchrec_compress.kernels"):
        assert advise_huge_pages(table) == 0
        assert use_huge_pages_(nn.Linear(4, 4), min_bytes=0) == {}
    assert "never" in caplog.text
    monkeypatch.setattr(kernels.sys, "platform", "darwin")
    assert "Linux" in (huge_pages_unavailable() or "")
    assert advise_huge_pages(table) == 0
    assert torch.equal(table, before)


@needs_huge_pages
def test_use_huge_pages_moves_large_tables_and_keeps_outputs() -> None:
    gen = torch.Generator().manual_seed(0)
    configs = [
        EmbeddingBagConfig(
            name="big", embedding_dim=64, num_embeddings=40_000, feature_names=["f"]
        ),
        EmbeddingBagConfig(name="small", embedding_dim=8, num_embeddings=10, feature_names=["g"]),
    ]
    ebc = EmbeddingBagCollection(configs)
    lengths = torch.randint(0, 5, (32,), generator=gen)
    ids = torch.cat(
        [
            torch.randint(40_000, (int(lengths[:16].sum()),), generator=gen),
            torch.randint(10, (int(lengths[16:].sum()),), generator=gen),
        ]
    )
    kjt = KeyedJaggedTensor.from_lengths_sync(["f", "g"], ids, lengths)
    expected = ebc(kjt).values()
    moved = use_huge_pages_(ebc, min_bytes=4 << 20)
    assert set(moved) <= {"embedding_bags.big.weight"}  # the 10-row table is too small
    assert torch.equal(ebc(kjt).values(), expected)
    assert use_huge_pages_(ebc, min_bytes=1 << 40) == {}
    # meta tensors and non-CPU storage are skipped, not touched
    assert use_huge_pages_(EmbeddingBagCollection(configs, device=torch.device("meta"))) == {}


@needs_huge_pages
def test_use_huge_pages_finds_fbgemm_rows_and_compressed_tables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torchrec_compress import PQEmbeddingBagCollection, RowWiseQuantConfig, compress_

    gen = torch.Generator().manual_seed(0)
    config = EmbeddingBagConfig(
        name="t", embedding_dim=64, num_embeddings=70_000, feature_names=["f"]
    )
    model = nn.Sequential(EmbeddingBagCollection([config]))
    compress_(model, RowWiseQuantConfig(bits=8))  # fbgemm's rows: a plain attribute of its TBE
    codes = torch.randint(256, (300_000, 16), dtype=torch.uint8, generator=gen)
    pq = PQEmbeddingBagCollection(
        [
            EmbeddingBagConfig(
                name="t", embedding_dim=64, num_embeddings=300_000, feature_names=["f"]
            )
        ],
        {"t": codes},
        {"t": torch.randn(16, 256, 4, generator=gen)},
    )
    kjt = KeyedJaggedTensor.from_lengths_sync(
        ["f"], torch.randint(70_000, (40,), generator=gen), torch.full((8,), 5)
    )
    expected = [model(kjt).values(), pq(kjt).values()]
    with monkeypatch.context() as patch:  # which storages are visited, whatever the OS grants
        visited: list[int] = []

        def record(tensor: torch.Tensor) -> int:
            visited.append(tensor.untyped_storage().nbytes())
            return 1

        patch.setattr(kernels, "advise_huge_pages", record)
        assert len(use_huge_pages_(model, min_bytes=2 << 20)) == 1
        assert len(use_huge_pages_(pq, min_bytes=2 << 20)) == 1
    # fbgemm's int8 rows (d + 4 bytes each, its buffer a little longer), then the codes
    assert len(visited) == 2 and 70_000 * 68 <= visited[0] < 70_000 * 68 + 4096
    assert visited[1] == 300_000 * 16
    use_huge_pages_(model, min_bytes=2 << 20)
    use_huge_pages_(pq, min_bytes=2 << 20)
    assert torch.equal(model(kjt).values(), expected[0])
    assert torch.equal(pq(kjt).values(), expected[1])
