"""Moments and lookup counts: exact, additive over batches / row ranges / workers, NaN-safe."""

import pytest
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_compress.moments import Moments, moments_from_counts, sync_
from torchrec_compress.statistics import LinearOutputCollector, LookupCounter, count_lookups
from torchrec_compress.testing import peak_cpu_allocation
from torchrec_compress.testing.multiprocess import run_multiprocess

TABLES = [
    EmbeddingBagConfig(name="ta", embedding_dim=4, num_embeddings=10, feature_names=["f0", "f1"]),
    EmbeddingBagConfig(name="tb", embedding_dim=4, num_embeddings=6, feature_names=["f1", "f2"]),
]


def _kjt(seed: int, weighted: bool = False) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (3 * 5,), generator=g)
    values = torch.randint(0, 6, (int(lengths.sum()),), generator=g)
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["f2", "f0", "f1"], values=values, lengths=lengths, weights=weights
    )


def _assert_moments_close(a: Moments, b: Moments) -> None:
    for name in ("count", "sum", "sum_outer"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("weighted", [False, True])
def test_counts_match_a_python_reference(weighted: bool) -> None:
    kjt = _kjt(0, weighted)
    counts = count_lookups(TABLES, [kjt], is_weighted=weighted)
    expected = {
        "ta": torch.zeros(10, dtype=torch.float64),
        "tb": torch.zeros(6, dtype=torch.float64),
    }
    feature_tables = {"f0": ["ta"], "f1": ["ta", "tb"], "f2": ["tb"]}
    for key, jt in kjt.to_dict().items():
        w = jt.weights() if weighted else torch.ones_like(jt.values(), dtype=torch.float32)
        for table in feature_tables[key]:
            for i, wi in zip(jt.values().tolist(), w.tolist(), strict=True):
                expected[table][i] += wi
    for table in expected:
        torch.testing.assert_close(counts[table], expected[table])


def test_counts_add_over_batches() -> None:
    both = count_lookups(TABLES, [_kjt(0), _kjt(1)])
    first, second = count_lookups(TABLES, [_kjt(0)]), count_lookups(TABLES, [_kjt(1)])
    for table in both:
        torch.testing.assert_close(both[table], first[table] + second[table])


def test_out_of_range_id_names_feature_and_table() -> None:
    counter = LookupCounter(TABLES)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f2"], values=torch.tensor([1, 7]), lengths=torch.tensor([2])
    )
    with pytest.raises(ValueError, match="feature 'f2' has id 7 outside table 'tb'"):
        counter.update(kjt)


def test_moments_add_over_batch_splits() -> None:
    torch.manual_seed(0)
    x, w = torch.randn(100, 5), torch.rand(100)
    whole = Moments.zeros(5)
    whole.update(x, w)
    parts = Moments.zeros(5), Moments.zeros(5)
    parts[0].update(x[:37], w[:37])
    parts[1].update(x[37:], w[37:])
    _assert_moments_close(parts[0] + parts[1], whole)
    torch.testing.assert_close(
        whole.mean(), (w[:, None].double() * x.double()).sum(0) / w.double().sum()
    )


def test_moments_add_over_row_ranges_and_chunks() -> None:
    torch.manual_seed(0)
    weight, counts = torch.randn(1000, 6), torch.randint(0, 5, (1000,)).double()
    whole = moments_from_counts(weight, counts)
    _assert_moments_close(moments_from_counts(weight, counts, chunk_rows=7), whole)
    shards = [(0, 300), (300, 301), (301, 1000)]
    summed = Moments.zeros(6)
    for start, end in shards:
        summed.add_(moments_from_counts(weight[start:end], counts, row_offset=start))
    _assert_moments_close(summed, whole)
    reference_cov = torch.cov(weight.double().T, fweights=counts.long(), correction=0)
    torch.testing.assert_close(whole.covariance(), reference_cov)


def test_nan_row_is_reported_with_table_and_row() -> None:
    weight = torch.randn(20, 3)
    weight[13, 1] = float("nan")
    with pytest.raises(ValueError, match="tab_x: weight row 13 contains NaN"):
        moments_from_counts(weight, torch.ones(20), chunk_rows=8, name="tab_x")
    # a NaN in a row nobody looks up does not matter
    counts = torch.ones(20)
    counts[13] = 0
    moments_from_counts(weight, counts, name="tab_x")


def test_nan_statistic_is_reported() -> None:
    moments = Moments.zeros(2)
    moments.update(torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(ValueError, match="layer 'fc'.*NaN or Inf"):
        moments.check_finite("layer 'fc'")


def test_linear_output_hooks_collect_and_detach() -> None:
    layer = nn.Linear(3, 2)
    x = torch.randn(4, 5, 3)  # extra leading dims are flattened
    with LinearOutputCollector({"fc": layer}) as collector:
        y = layer(x)
    layer(x)  # hook removed: not counted
    moments = collector.moments["fc"]
    assert moments.count.item() == 20
    torch.testing.assert_close(moments.sum, y.detach().reshape(-1, 2).double().sum(0))


def _sync_body(rank: int, world_size: int) -> list[float]:
    torch.manual_seed(0)
    weight, counts = torch.randn(50, 3), torch.rand(50).double()
    half = 25
    start = rank * half
    mine = {"t": moments_from_counts(weight[start : start + half], counts, row_offset=start)}
    local_counts = {"c": torch.full((2,), float(rank + 1), dtype=torch.float64)}
    sync_({**mine, **local_counts})
    whole = moments_from_counts(weight, counts)
    _assert_moments_close(mine["t"], whole)
    return local_counts["c"].tolist()


def test_sync_sums_over_workers() -> None:
    assert run_multiprocess(_sync_body, world_size=2, timeout_s=120) == [[3.0, 3.0], [3.0, 3.0]]


def test_counting_a_batch_costs_batch_memory_not_table_memory() -> None:
    """Each batch made two N-row temporaries (an int64 bincount and its float64 copy): 320 MB
    per batch for a 20M-row table.  Weighted sums stay those of one bincount per batch."""
    num_rows = 2_000_000
    tables = [
        EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=num_rows, feature_names=["f"])
    ]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(num_rows, (5000,), generator=gen)
    weights = torch.rand(5000, generator=gen)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f"], values=ids, lengths=torch.full((1000,), 5), weights=weights
    )
    counter = LookupCounter(tables, is_weighted=True)
    counter.update(kjt)
    peak, _ = peak_cpu_allocation(lambda: counter.update(kjt))
    assert peak < num_rows * 8 / 8, f"{peak} bytes to count 5000 ids"
    once = torch.bincount(ids, weights.double(), minlength=num_rows)
    assert torch.equal(counter.counts()["t"], once + once)
