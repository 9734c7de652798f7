import dataclasses
import math

import pytest
import torch

from torchrec_compress.methods.pq import (
    MECQuantizer,
    ProductQuantizer,
    RowSampler,
    assign,
    codebook_perplexity,
    decode,
    reconstruction_mse,
    row_weights,
    stratified_rows,
    train_mec,
    train_pq_table,
)
from torchrec_compress.methods.pq import kernels as _ops
from torchrec_compress.methods.pq.config import MECConfig, MECOverride, MECTraining

# one intra-op thread for every test of this module (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


_FAST = dict(num_subspaces=4, num_centroids=16)
_TRAIN = dict(sample_size=512, learning_rate=1e-2)


def _skewed_table(num_rows: int = 4000, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Most rows crowd around one centre; lookup counts are Zipf-like."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, d, generator=gen) * 3
    cluster = torch.multinomial(
        torch.tensor([0.85, 0.1, 0.04, 0.01]), num_rows, True, generator=gen
    )
    rows = centres[cluster] + 0.3 * torch.randn(num_rows, d, generator=gen)
    counts = (1e5 / torch.arange(1, num_rows + 1)).floor()
    return rows, counts


def test_row_weights() -> None:
    counts = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 1023.0, 1024.0])
    torch.testing.assert_close(row_weights(counts, 7), torch.tensor([1.0, 1, 1, 1, 2, 9, 10]))
    assert torch.equal(row_weights(counts, 7, popularity_weighting=False), torch.ones(7))
    assert torch.equal(row_weights(None, 3), torch.ones(3))
    with pytest.raises(ValueError, match=r"\[5\]"):
        row_weights(counts, 5)


def test_sampling_frequency_is_proportional_to_weights() -> None:
    weights = torch.tensor([1.0, 0.0, 2.0, 3.0, 4.0])
    sampler = RowSampler(weights, torch.Generator().manual_seed(0))
    draws = 200_000
    freq = torch.bincount(sampler.sample(draws), minlength=5).double() / draws
    expected = weights.double() / weights.sum()
    # Binomial std of each frequency is <= 0.0012 here; 5 sigma.
    torch.testing.assert_close(freq, expected, atol=6e-3, rtol=0)
    assert freq[1] == 0


def test_training_beats_random_codebooks() -> None:
    rows, counts = _skewed_table()
    codes, books, metrics = train_pq_table(
        rows, counts, MECConfig(**_FAST, training=MECTraining(**_TRAIN, steps=100)), "toy"
    )
    gen = torch.Generator().manual_seed(1)
    random_pq = ProductQuantizer(16, 4, 16)
    random_pq.codebooks = rows[torch.randint(len(rows), (16,), generator=gen)].view(16, 4, 4)
    random_pq.codebooks = random_pq.codebooks.transpose(0, 1).contiguous()
    random_mse = reconstruction_mse(rows, random_pq.compute_codes(rows), random_pq.codebooks)
    assert metrics.mse == pytest.approx(reconstruction_mse(rows, codes, books))
    assert metrics.mse < 0.5 * random_mse


def test_balance_term_raises_perplexity() -> None:
    # keep_best=False: compare what training itself does.  The default (sharp) soft assignment
    # spreads the hard codes; a soft one (temperature 0.1) is maximised by rows sitting equally
    # far from many codewords, and the hard codes bunch up instead.
    rows, counts = _skewed_table()
    perplexities = {}
    for name, extra in (
        ("none", {"balance_weight": 0.0}),
        ("sharp", {"balance_weight": 1.0}),
        (
            "soft",
            {"balance_weight": 1.0, "balance_temperature": 0.1, "balance_temperature_final": 0.1},
        ),
    ):
        config = MECConfig(
            **_FAST, training=MECTraining(**_TRAIN, **extra, steps=100, keep_best=False)
        )
        _, _, metrics = train_pq_table(rows, counts, config, "toy")
        perplexities[name] = min(metrics.perplexity)
    assert perplexities["sharp"] > perplexities["none"] >= 0.5 * 16
    assert perplexities["soft"] < perplexities["sharp"] - 1.5


def test_keep_best_is_never_worse_than_kmeans() -> None:
    rows, counts = _skewed_table(2000)
    weights = counts  # MEC keeps the state that reconstructs rows drawn like lookups best
    pq_codes, pq_books, _ = train_pq_table(
        rows, counts, MECConfig(**_FAST, mode="pq", training=MECTraining(**_TRAIN)), "toy"
    )
    pq_mse = reconstruction_mse(rows, pq_codes, pq_books, weights)
    # A learning rate far too high wrecks the codebooks; the k-means start must survive.
    wild = MECConfig(
        **_FAST,
        training=MECTraining(**{**_TRAIN, "learning_rate": 1.0}, steps=30, reseed_interval=10),
    )
    for keep_best in (True, False):
        config = dataclasses.replace(
            wild, training=dataclasses.replace(wild.training, keep_best=keep_best)
        )
        codes, books, _ = train_pq_table(rows, counts, config, "toy")
        mse = reconstruction_mse(rows, codes, books, weights)
        if keep_best:
            assert mse <= pq_mse * 1.02
        else:
            assert mse > pq_mse * 1.5


def test_dead_codewords_are_reseeded() -> None:
    rows, counts = _skewed_table(2000)
    gen = torch.Generator().manual_seed(0)
    books = rows[torch.randint(len(rows), (16,), generator=gen)].view(16, 4, 4).transpose(0, 1)
    books = books.contiguous()
    books[:, 8:] += 1e3  # half of every codebook far away: no row ever picks them
    used = []
    for interval in (0, 10):
        mec = MECQuantizer(books)
        config = MECConfig(
            **_FAST,
            training=MECTraining(
                **_TRAIN, steps=40, reseed_interval=interval, keep_best=False, balance_weight=0.0
            ),
        )
        history = train_mec(mec, rows, row_weights(counts, len(rows)), config, gen)
        codes = mec.compute_codes(rows)
        used.append(min(len(torch.unique(codes[:, m])) for m in range(4)))
        assert (sum(h["reseeded"] for h in history) > 0) == (interval > 0)
    assert used[0] <= 8 and used[1] >= 14


def test_history_says_how_many_codes_training_moved_and_which_state_is_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """MEC and PQ gave the same AUC to seven digits: the history and the log now say whether
    training moved the k-means codes, and which state (0: the k-means start) MEC ends with."""
    rows, counts = _skewed_table(1000)
    for keep_best in (True, False):
        gen = torch.Generator().manual_seed(0)
        books = rows[torch.randint(len(rows), (16,), generator=gen)].view(16, 4, 4)
        mec = MECQuantizer(books.transpose(0, 1).contiguous())
        training = MECTraining(**_TRAIN, steps=20, reseed_interval=5, keep_best=keep_best)
        config = MECConfig(**_FAST, training=training)
        history = train_mec(mec, rows, row_weights(counts, len(rows)), config, gen)
        assert history[0]["codes_changed"] == 0.0
        assert 0.0 < max(h["codes_changed"] for h in history) <= 1.0
        assert sum(h["kept"] for h in history) == 1.0
        assert keep_best or history[-1]["kept"] == 1.0
    with caplog.at_level("INFO", logger="torchrec_compress.methods.pq.fitting"):
        train_pq_table(rows, counts, MECConfig(**_FAST, training=MECTraining(steps=5)), "toy")
    assert "table 'toy': MEC kept the state of step" in caplog.text
    assert "differ from k-means' for" in caplog.text


def test_training_is_scale_free() -> None:
    rows, counts = _skewed_table(1000)
    config = MECConfig(**_FAST, training=MECTraining(**_TRAIN, steps=10))
    codes, books, _ = train_pq_table(rows, counts, config, "toy")
    scaled_codes, scaled_books, _ = train_pq_table(1000.0 * rows + 5.0, counts, config, "toy")
    assert (codes == scaled_codes).float().mean() > 0.99
    torch.testing.assert_close(scaled_books, 1000.0 * books + 5.0, rtol=1e-3, atol=1e-1)


def test_num_centroids_is_capped_by_rows() -> None:
    rows = torch.randn(10, 8)
    for mode in ("pq", "mec"):
        config = MECConfig(
            num_subspaces=2,
            num_centroids=256,
            mode=mode,
            training=MECTraining(steps=5, sample_size=8),
        )
        codes, books, metrics = train_pq_table(rows, None, config, "tiny")
        assert books.shape == (2, 10, 4) and codes.dtype == torch.uint8
        assert metrics.mse < 1e-6 and metrics.distinct_codes == 10


def test_pq_mode_is_kmeans_only() -> None:
    rows, counts = _skewed_table(500)
    config = MECConfig(**_FAST, mode="pq", training=MECTraining(**_TRAIN, kmeans_iterations=5))
    codes, books, metrics = train_pq_table(rows, counts, config, "toy")
    pq = ProductQuantizer(16, 4, 16)
    pq.codebooks = books
    assert torch.equal(codes, pq.compute_codes(rows))
    assert metrics.weighted_perplexity != metrics.perplexity  # counts do weigh in


def test_straight_through_reaches_encoder_and_codebooks() -> None:
    rows, _ = _skewed_table(256)
    mec = MECQuantizer(torch.randn(4, 16, 4))
    for shared in (False, True):
        config = MECConfig(
            **_FAST, training=MECTraining(**_TRAIN, reference_shared_negative=shared)
        )
        mec.zero_grad()
        losses = mec.loss(rows, config, torch.Generator().manual_seed(0))
        assert set(losses) == {
            "reconstruction",
            "codebook",
            "commitment",
            "contrastive",
            "balance",
            "total",
        }
        losses["total"].backward()
        for name in ("encoder", "decoder", "codebooks"):
            grad = getattr(mec, name).grad
            assert grad is not None and grad.abs().sum() > 0, name
    # The encoder trains through the contrastive/reconstruction path alone, not only commitment.
    mec.zero_grad()
    losses = mec.loss(
        rows,
        MECConfig(
            **_FAST, training=MECTraining(**_TRAIN, commitment_weight=0.0, balance_weight=0.0)
        ),
        torch.Generator(),
    )
    (losses["reconstruction"] + losses["contrastive"]).backward()
    assert mec.encoder.grad.abs().sum() > 0


def test_decoded_codebooks_live_in_the_original_space() -> None:
    gen = torch.Generator().manual_seed(3)
    mec = MECQuantizer(torch.randn(2, 8, 3, generator=gen))
    with torch.no_grad():
        mec.decoder.copy_(torch.randn(2, 3, 3, generator=gen))
        mec.encoder.copy_(torch.randn(2, 3, 3, generator=gen))
    x = torch.randn(10, 6, generator=gen)
    codes = mec.compute_codes(x, chunk_size=3)
    z = mec.encode(x)
    q = torch.gather(mec.codebooks, 1, assign(z, mec.codebooks)[0].unsqueeze(-1).expand(-1, -1, 3))
    reconstruction = torch.bmm(q, mec.decoder).transpose(0, 1).reshape(10, 6)
    torch.testing.assert_close(decode(codes, mec.decoded_codebooks()), reconstruction)


@pytest.mark.parametrize("use_kernels", [True, False])
def test_mec_compute_codes_paths_agree(use_kernels: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Encodings near known codewords get exactly those codes, through the fused C++ encoder
    (20M rows: ~30 s instead of ~5 min of batched matmuls) or the torch path."""
    if use_kernels and not _ops.HAS_KERNELS:
        pytest.skip("C++ kernels not built")
    gen = torch.Generator().manual_seed(5)
    mec = MECQuantizer(torch.randn(4, 32, 3, generator=gen), torch.randn(12, generator=gen), 2.0)
    with torch.no_grad():
        mec.encoder.copy_(torch.eye(3) + 0.3 * torch.randn(4, 3, 3, generator=gen))
    want = torch.randint(32, (300, 4), generator=gen)
    # rows whose encodings sit next to codewords `want`: invert standardise and encoder
    near = decode(want, mec.codebooks.detach()) + 1e-4 * torch.randn(300, 12, generator=gen)
    sub = near.view(300, 4, 3).transpose(0, 1)
    rows = torch.bmm(sub, torch.linalg.inv(mec.encoder.detach())).transpose(0, 1).reshape(300, 12)
    x = rows * mec.scale + mec.center
    monkeypatch.setattr(_ops, "HAS_KERNELS", use_kernels)
    calls = []
    if use_kernels:
        encode = torch.ops.torchrec_compress.pq_encode
        monkeypatch.setattr(
            torch.ops.torchrec_compress, "pq_encode", lambda *a: calls.append(1) or encode(*a)
        )
    assert torch.equal(mec.compute_codes(x, chunk_size=37).long(), want)
    # kernel blocks hold K / dsub = 10 times the rows of a torch block: 370 rows, one call
    assert len(calls) == (1 if use_kernels else 0)


def test_large_k_uses_int16_and_overrides_apply() -> None:
    rows = torch.randn(400, 8)
    config = MECConfig(
        num_subspaces=4,
        num_centroids=300,
        table_overrides={"wide": MECOverride(num_subspaces=2)},
        training=MECTraining(steps=1, sample_size=32, kmeans_iterations=1),
    )
    codes, books, _ = train_pq_table(rows, None, config, "t")
    assert codes.dtype == torch.int16 and codes.shape == (400, 4) and books.shape == (4, 300, 2)
    assert int(codes.max()) < 300
    codes, books, _ = train_pq_table(rows, None, config, "wide")
    assert codes.shape == (400, 2) and books.shape == (2, 300, 4)


def test_bad_inputs_name_the_table() -> None:
    config = MECConfig(
        num_subspaces=3, num_centroids=4, training=MECTraining(steps=1, sample_size=8)
    )
    with pytest.raises(ValueError, match=r"table 'ads'.*not divisible by num_subspaces=3"):
        train_pq_table(torch.randn(10, 8), None, config, "ads")
    config = MECConfig(
        num_subspaces=2,
        num_centroids=4,
        training=MECTraining(steps=1, sample_size=8, chunk_size=4),
    )
    rows = torch.randn(10, 8)
    rows[6, 1] = math.nan
    with pytest.raises(ValueError, match=r"table 'ads': row 6 has NaN"):
        train_pq_table(rows, None, config, "ads")
    with pytest.raises(ValueError, match=r"table 'ads': cannot quantize an empty table"):
        train_pq_table(torch.empty(0, 8), None, config, "ads")
    with pytest.raises(ValueError, match="mode"):
        MECConfig(mode="opq")
    with pytest.raises(ValueError, match="num_centroids"):
        MECConfig(num_centroids=2**31 + 1)
    with pytest.raises(ValueError, match=r"perplexity_floor must be in \[0, 1\], got 1.5"):
        MECConfig(training=MECTraining(perplexity_floor=1.5))
    with pytest.raises(ValueError, match="balance_sample_size must be >= 0, got -1"):
        MECConfig(training=MECTraining(balance_sample_size=-1))


def test_config_round_trip() -> None:
    config = MECConfig(table_overrides={"t": MECOverride(skip=True), "u": MECOverride(steps=3)})
    assert MECConfig.from_dict(config.to_dict()) == config
    assert config.for_table("u").training.steps == 3 and config.for_table("u").table_overrides == {}


def test_config_separates_storage_from_training() -> None:
    """What is stored (M, K, weighting) is MECConfig's; how codes are trained is MECTraining's."""
    storage = {"num_subspaces", "num_centroids", "popularity_weighting", "weighting"}
    assert storage <= {f.name for f in dataclasses.fields(MECConfig)}
    assert not {"steps", "learning_rate", "kmeans_iterations"} & {
        f.name for f in dataclasses.fields(MECConfig)
    }
    with pytest.raises(TypeError, match="steps"):
        MECConfig(steps=3)  # type: ignore[call-arg]
    # configs written before the split (flat, e.g. a run.json) still load
    old = {"num_subspaces": 4, "steps": 7, "kmeans_iterations": 3, "mode": "pq"}
    config = MECConfig.from_dict(old)
    assert (config.num_subspaces, config.training.steps, config.training.kmeans_iterations) == (
        4,
        7,
        3,
    )
    assert MECConfig.from_dict(config.to_dict()) == config


def _collapsed_start() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows, codebooks and counts: the first 8 codewords are exactly the only 8 looked-up rows,
    the other 8 are far away (unused).  The start reconstructs every lookup exactly, yet its codes
    use at most 8 of the 16 codewords (perplexity < 0.5 K over all rows)."""
    rows = torch.randn(2000, 16, generator=torch.Generator().manual_seed(0))
    books = rows[:16].clone().view(16, 4, 4).transpose(0, 1).contiguous()
    books[:, 8:] += 1e3
    counts = torch.zeros(len(rows))
    counts[:8] = 1000.0
    return rows, books, counts


def _train_from_collapsed_start(floor: float) -> tuple[float, list[dict[str, float]]]:
    """Perplexity (min over subspaces, all rows) of the kept state, and the training history."""
    rows, books, counts = _collapsed_start()
    mec = MECQuantizer(books)
    config = MECConfig(
        **_FAST,
        training=MECTraining(**_TRAIN, steps=40, reseed_interval=10, perplexity_floor=floor),
    )
    weights = row_weights(counts, len(rows))
    history = train_mec(mec, rows, weights, config, torch.Generator(), counts)
    return codebook_perplexity(mec.compute_codes(rows), 16).min().item(), history


def test_perplexity_floor_keeps_a_balanced_state() -> None:
    # Lookup-weighted MSE alone keeps the exact but collapsed start; the floor rules it out and
    # re-seeding yields balanced states.
    unfloored, _ = _train_from_collapsed_start(0.0)
    floored, history = _train_from_collapsed_start(0.5)
    assert unfloored < 0.5 * 16 <= floored
    eligible = [h for h in history if h["validation_perplexity"] >= 0.5 * 16]
    best = min(eligible, key=lambda h: h["validation_mse"])
    # 2000 rows <= validation_size: the uniform validation sample is the whole table.
    assert floored == pytest.approx(best["validation_perplexity"])
    assert best["validation_mse"] > history[0]["validation_mse"]


def test_unreachable_perplexity_floor_keeps_the_most_balanced_state() -> None:
    kept, history = _train_from_collapsed_start(1.0)
    assert kept == pytest.approx(max(h["validation_perplexity"] for h in history))
    assert kept > history[0]["validation_perplexity"]


def test_contrastive_negatives_do_not_repel_codewords() -> None:
    # Pushing the swapped-in codeword away from every anchor drives codewords out of the dense
    # region of rarely looked-up rows and collapses their codes: the negatives train the encoder
    # and decoder only.
    rows, _ = _skewed_table(256)
    mec = MECQuantizer(torch.randn(4, 16, 4, generator=torch.Generator().manual_seed(0)))
    losses = mec.loss(
        rows, MECConfig(**_FAST, training=MECTraining(**_TRAIN)), torch.Generator().manual_seed(0)
    )
    losses["contrastive"].backward()
    assert mec.codebooks.grad is None or not mec.codebooks.grad.any()
    assert mec.encoder.grad.abs().sum() > 0 and mec.decoder.grad.abs().sum() > 0


def test_stratified_rows_keeps_popular_rows_and_estimates_table_sums() -> None:
    gen = torch.Generator().manual_seed(0)
    num_rows, size = 100_000, 4_000
    counted = torch.randperm(num_rows, generator=gen)[:3_000]
    counts = (torch.randperm(3_000, generator=gen) + 1).double()  # distinct: one top set
    ids, scale = stratified_rows(num_rows, counted, counts, size, gen)
    assert torch.equal(ids, torch.unique(ids))  # sorted, distinct
    assert ids.numel() <= size
    # the size // 2 most looked-up rows are all in, each standing for itself
    top = counted[torch.argsort(counts, descending=True)[: size // 2]]
    assert bool(torch.isin(top, ids).all())
    assert torch.equal(scale[torch.isin(ids, top)], torch.ones(size // 2))
    # the scale makes sums over the sample estimate sums over the table (here: the row count,
    # and a smooth function of the id)
    assert float(scale.sum()) == pytest.approx(num_rows, rel=1e-6)
    values = (torch.arange(num_rows).double() / num_rows).sin()
    assert float((values[ids] * scale.double()).sum()) == pytest.approx(
        float(values.sum()), rel=0.03
    )


def test_stratified_rows_is_the_whole_table_when_it_fits() -> None:
    ids, scale = stratified_rows(10, torch.tensor([3]), torch.tensor([5.0]), 10)
    assert torch.equal(ids, torch.arange(10)) and torch.equal(scale, torch.ones(10))


def test_lookup_weighting_spends_codewords_on_popular_rows() -> None:
    # 1-dim rows: 200 popular rows near 0 (looked up 1000 times each) and 2000 rare rows spread
    # over [1, 100].  Lookup weighting must reconstruct the popular rows better than log2 weighting.
    gen = torch.Generator().manual_seed(0)
    popular = torch.rand(200, 1, generator=gen) * 0.5
    rare = 1 + 99 * torch.rand(2000, 1, generator=gen)
    rows = torch.cat([popular, rare])
    counts = torch.cat([torch.full((200,), 1000.0), torch.ones(2000)])
    errors = {}
    for weighting in ("log2", "lookups"):
        config = MECConfig(num_subspaces=1, num_centroids=16, mode="pq", weighting=weighting)
        codes, books, _ = train_pq_table(rows, counts, config, "t")
        decoded = decode(codes, books)
        errors[weighting] = float((decoded[:200] - popular).pow(2).mean())
    assert errors["lookups"] < 0.25 * errors["log2"]


def test_unknown_weighting_is_refused() -> None:
    with pytest.raises(ValueError, match="weighting must be 'log2' or 'lookups'"):
        MECConfig(weighting="sqrt")


def test_codewords_of_popular_rows_survive_reseeding() -> None:
    """Training draws rows by log2 n, so a codeword that serves a handful of very popular rows
    can go unpicked for a whole re-seeding interval; it was re-seeded as dead, and the rows the
    CTR model looks up most lost their codeword (lookup-weighted error +50% on the synthetic
    default).  What the lookup-drawn validation rows use is alive."""
    gen = torch.Generator().manual_seed(0)
    tail = torch.randn(20000, 4, generator=gen)
    head = torch.full((4, 4), 40.0) + 0.1 * torch.arange(4.0).unsqueeze(1)  # far from the rest
    rows = torch.cat([tail, head])
    counts = torch.zeros(len(rows))
    counts[-4:] = 1e6  # every lookup hits the head rows
    books = torch.cat([tail[:15], head[:1]]).view(16, 1, 4).transpose(0, 1).contiguous()
    config = MECConfig(
        num_subspaces=1,
        num_centroids=16,
        training=MECTraining(
            sample_size=32,
            learning_rate=1e-3,
            steps=50,
            reseed_interval=5,
            keep_best=False,
            balance_weight=0.0,
            contrastive_weight=0.0,
        ),
    )
    mec = MECQuantizer(books)
    train_mec(mec, rows, row_weights(counts, len(rows)), config, gen, validation_weights=counts)
    codes = mec.compute_codes(head)
    decoded = mec.decoded_codebooks()[0, codes[:, 0].long()]
    # the head's codeword stays with the head rows (0.6 apart at most; the tail is 80 away)
    assert (decoded - head).norm(dim=1).max() < 2.0
