"""Synthetic CTR data with a hidden teacher: the project's embedded default dataset.

Rows are not noise: ids follow a Zipf law over each table, and labels come from a hidden
low-rank factorisation-machine teacher whose per-id latent vectors are computed on the fly from
a hash of ``(seed, feature, popularity rank)``.  Nothing is stored per id or per row, so tables
may have up to 2**32 rows (a billion-row table costs nothing) and any split length works.

- Ids: a popularity rank ``r`` is drawn from a continuous power law by inverse CDF and mapped to
  an id by a seeded affine bijection ``id = (a * r + b) mod N``, so popular ids are spread over
  the table instead of being ``0..k``.
- Labels: ``logit = scale * (sum_{f<g} <u_f, u_g> + sum_f bias_f) / std + dense_weight * <v, x>
  + intercept``; ``u_f`` is the mean latent of feature ``f``'s bag, scaled by
  ``(1 + r) ** -popularity_decay`` so that popular ids, which a model sees often enough to
  learn, carry most of the signal.  ``label ~ Bernoulli(sigmoid(logit + noise * N(0, 1)))``
  with the intercept solved for ``positive_rate``.  :meth:`SyntheticCTRDataset.teacher_logits`
  returns the noiseless logit, the Bayes-optimal score for AUC.
- Rows are generated in blocks of ``block_rows`` seeded by ``(seed, split, block)``, so data does
  not depend on world size or batch size, and a rank generates only the blocks it reads.
- Streaming by default (``fresh_train_rows``): each epoch of the train split is new rows, as in
  production CTR training (one pass over fresh data); a model cannot overfit rows it saw.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torchrec.datasets.utils import Batch

from torchrec_compress.data.schema import (
    SPLITS,
    CTRSchema,
    RowBlock,
    block_batches,
    check_split,
    shuffled_blocks,
)

_MAX_TABLE_ROWS = 2**32  # keeps a * r (both < N) inside uint64 for the id bijection
_CALIBRATION_ROWS = 32_768


@dataclass(frozen=True)
class SyntheticCTRConfig:
    """Parameters of the synthetic CTR generator (plain, printable data).

    Args:
        num_dense: dense features (standard normal), at least 1.
        num_embeddings: rows of each sparse feature's table; features are named ``f0, f1, ...``.
        pooling: per feature, 1 for one-hot; ``p > 1`` for multi-hot bags whose length is uniform
            in ``0..p`` (so some bags are empty).
        zipf_exponent: power-law exponent of id popularity.
        teacher_rank: dimension of the teacher's per-id latent vectors.
        teacher_scale: standard deviation of the sparse part of the teacher logit.
        popularity_decay: latent vectors and biases of popularity rank ``r`` are scaled by
            ``(1 + r) ** -popularity_decay``.
        dense_weight: weight of the (small) dense term of the logit.
        noise: standard deviation of logit noise added before drawing labels.
        positive_rate: target fraction of positive labels.
        train_rows, val_rows, test_rows: rows per split.
        block_rows: rows generated per block (the unit of generation and of shuffling).
        seed: seed of everything (teacher, bijections, rows).
        fresh_train_rows: streaming, like production CTR training: every epoch of the train
            split is ``train_rows`` rows never seen before (epoch ``e`` reads rows ``e *
            train_rows ..``), so no row is seen twice and an "epoch" is a pass over fresh data;
            ``False``: the same ``train_rows`` rows every epoch, reshuffled.

    Example::

        >>> config = SyntheticCTRConfig(num_embeddings=(100, 10**9), pooling=(1, 3), seed=1)
        >>> config.num_embeddings[1]
        1000000000
    """

    num_dense: int = 13
    num_embeddings: tuple[int, ...] = (
        50,
        200,
        1_000,
        3_000,
        10_000,
        20_000,
        40_000,
        80_000,
        120_000,
        200_000,
    )
    pooling: tuple[int, ...] = (1, 1, 1, 3, 1, 1, 1, 1, 5, 1)
    zipf_exponent: float = 1.1
    teacher_rank: int = 4
    teacher_scale: float = 2.5
    popularity_decay: float = 0.25
    dense_weight: float = 0.1
    noise: float = 0.3
    positive_rate: float = 0.25
    train_rows: int = 400_000
    val_rows: int = 50_000
    test_rows: int = 50_000
    block_rows: int = 8_192
    seed: int = 0
    fresh_train_rows: bool = True

    def __post_init__(self) -> None:
        # Lists (e.g. from a command line) become tuples, keeping the config hashable.
        object.__setattr__(self, "num_embeddings", tuple(self.num_embeddings))
        object.__setattr__(self, "pooling", tuple(self.pooling))
        if len(self.pooling) != len(self.num_embeddings):
            raise ValueError(
                f"pooling has {len(self.pooling)} entries but num_embeddings has {len(self.num_embeddings)}"
            )
        for index, (rows, pooling) in enumerate(
            zip(self.num_embeddings, self.pooling, strict=True)
        ):
            if not 1 <= rows <= _MAX_TABLE_ROWS:
                raise ValueError(f"feature 'f{index}' has {rows} rows; valid: 1..{_MAX_TABLE_ROWS}")
            if pooling < 1:
                raise ValueError(f"feature 'f{index}' has pooling {pooling}; valid: >= 1")
        if self.num_dense < 1 or self.teacher_rank < 1 or self.block_rows < 1:
            raise ValueError("num_dense, teacher_rank and block_rows must be >= 1")
        if not 0 < self.positive_rate < 1:
            raise ValueError(f"positive_rate must be in (0, 1), got {self.positive_rate}")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic): a cheap, well-mixed hash."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _zipf_ranks(uniform: np.ndarray, num_rows: int, exponent: float) -> np.ndarray:
    """Popularity ranks in ``[0, num_rows)`` with ``P(r) ~ (r + 1) ** -exponent`` (inverse CDF)."""
    top = float(num_rows) + 1.0
    if abs(exponent - 1.0) < 1e-9:
        x = np.power(top, uniform)
    else:
        power = 1.0 - exponent
        x = np.power(1.0 + uniform * (top**power - 1.0), 1.0 / power)
    return np.clip(np.floor(x).astype(np.int64) - 1, 0, num_rows - 1)


class SyntheticCTRDataset:
    """Deterministic synthetic CTR dataset (see the module docstring).

    Args:
        config: generator parameters.

    Example::

        >>> ds = SyntheticCTRDataset(SyntheticCTRConfig(train_rows=1000, val_rows=100, test_rows=100))
        >>> batch = next(ds.batches("train", batch_size=256))
        >>> batch.dense_features.shape, batch.sparse_features.keys()[:2]
        (torch.Size([250, 13]), ['f0', 'f1'])
    """

    def __init__(self, config: SyntheticCTRConfig) -> None:
        self.config = config
        self.schema = CTRSchema(
            dense_in_features=config.num_dense,
            sparse_features=tuple(f"f{i}" for i in range(len(config.num_embeddings))),
            num_embeddings=tuple(config.num_embeddings),
        )
        setup = np.random.default_rng([config.seed, 0xC0FFEE])
        self._multiplier, self._offset = [], []
        for rows in config.num_embeddings:
            multiplier = int(setup.integers(1, max(rows, 2))) % rows or 1
            while math.gcd(multiplier, rows) != 1:
                multiplier = multiplier % (rows - 1) + 1
            self._multiplier.append(multiplier)
            self._offset.append(int(setup.integers(0, rows)))
        dense_direction = setup.standard_normal(config.num_dense)
        self._dense_direction = dense_direction / np.linalg.norm(dense_direction)
        self._sparse_std, self._intercept = 1.0, 0.0
        self._calibrate()

    def num_rows(self, split: str) -> int:
        """Rows of ``split``."""
        check_split(split)
        return {
            "train": self.config.train_rows,
            "val": self.config.val_rows,
            "test": self.config.test_rows,
        }[split]

    def batches(
        self, split: str, batch_size: int, rank: int = 0, world_size: int = 1, epoch: int = 0
    ) -> Iterator[Batch]:
        """Batches of ``rank``'s share of ``split``; ``epoch`` reshuffles train (blocks and rows)
        and, with ``fresh_train_rows``, reads rows no earlier epoch read."""
        check_split(split)
        total, block = self.num_rows(split), self.config.block_rows
        block_sizes = [min(block, total - start) for start in range(0, total, block)]
        split_index = SPLITS.index(split)
        first_block = (
            epoch * len(block_sizes) if split == "train" and self.config.fresh_train_rows else 0
        )

        def load(index: int) -> RowBlock:
            rng = np.random.default_rng([self.config.seed, split_index, first_block + index])
            return self._generate(rng, block_sizes[index])

        sizes: list[int] = block_sizes
        loader: Callable[[int], RowBlock] = load
        if split == "train":
            sizes, loader = shuffled_blocks(block_sizes, load, self.config.seed, epoch)
        return block_batches(
            sizes, loader, self.schema.sparse_features, batch_size, rank, world_size, split
        )

    def teacher_logits(self, batch: Batch) -> torch.Tensor:
        """Noiseless teacher logit of each row of ``batch``: the Bayes-optimal score.

        Example::

            >>> ds = SyntheticCTRDataset(SyntheticCTRConfig(train_rows=10, val_rows=10, test_rows=10))
            >>> ds.teacher_logits(next(ds.batches("test", 10))).shape
            torch.Size([10])
        """
        sparse = batch.sparse_features
        lengths = sparse.lengths().numpy().reshape(len(self.schema.sparse_features), -1)
        ids = [part.numpy() for part in sparse.values().split(sparse.length_per_key())]
        logits = self._logits(
            lengths, self._ranks(ids), batch.dense_features.numpy().astype(np.float64)
        )
        return torch.from_numpy(logits.astype(np.float32))

    def _generate(self, rng: np.random.Generator, num_rows: int) -> RowBlock:
        config = self.config
        dense = rng.standard_normal((num_rows, config.num_dense))
        lengths = np.ones((len(config.num_embeddings), num_rows), dtype=np.int32)
        ranks, ids = [], []
        for feature, (rows, pooling) in enumerate(
            zip(config.num_embeddings, config.pooling, strict=True)
        ):
            if pooling > 1:
                lengths[feature] = rng.integers(0, pooling + 1, num_rows)
            feature_ranks = _zipf_ranks(
                rng.random(int(lengths[feature].sum())), rows, config.zipf_exponent
            )
            ranks.append(feature_ranks)
            ids.append(self._ids(feature, feature_ranks))
        logits = self._logits(lengths, ranks, dense) + config.noise * rng.standard_normal(num_rows)
        labels = (rng.random(num_rows) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
        return RowBlock(dense.astype(np.float32), labels, lengths, tuple(ids))

    def _ids(self, feature: int, ranks: np.ndarray) -> np.ndarray:
        rows = np.uint64(self.config.num_embeddings[feature])
        mixed = ranks.astype(np.uint64) * np.uint64(self._multiplier[feature]) % rows
        return ((mixed + np.uint64(self._offset[feature])) % rows).astype(np.int64)

    def _ranks(self, ids: list[np.ndarray]) -> list[np.ndarray]:
        """Inverse of :meth:`_ids`, per feature: ``r = (id - b) * a^-1 mod N``."""
        ranks = []
        for feature, feature_ids in enumerate(ids):
            rows = self.config.num_embeddings[feature]
            inverse = np.uint64(pow(self._multiplier[feature], -1, rows) if rows > 1 else 0)
            shifted = (
                feature_ids.astype(np.uint64) + np.uint64(rows - self._offset[feature])
            ) % np.uint64(rows)
            ranks.append((shifted * inverse % np.uint64(rows)).astype(np.int64))
        return ranks

    def _latents(self, feature: int, ranks: np.ndarray) -> np.ndarray:
        """``[n, teacher_rank + 1]``: latent vector and bias of each rank, popularity-scaled."""
        width = self.config.teacher_rank + 1
        key = (self.config.seed * 1_000_003 + feature) * 4_099 * width % 2**64
        codes = (
            ranks.astype(np.uint64)[:, None] * np.uint64(0x2545F4914F6CDD1D)
            + np.uint64(key)
            + np.arange(width, dtype=np.uint64)
        )
        # Uniform on [-sqrt(3), sqrt(3)): unit variance, from the top 53 bits of the hash.
        unit = (_splitmix64(codes) >> np.uint64(11)).astype(np.float64) * 2.0**-53
        scale = np.power(1.0 + ranks, -self.config.popularity_decay)[:, None]
        return (unit * 2.0 - 1.0) * math.sqrt(3.0) * scale

    def _sparse_logits(self, lengths: np.ndarray, ranks: list[np.ndarray]) -> np.ndarray:
        """Unscaled sparse part of the teacher: pairwise latent interactions plus biases."""
        num_rows = lengths.shape[1]
        rank_dim = self.config.teacher_rank
        total = np.zeros((num_rows, rank_dim))
        squares = np.zeros(num_rows)
        bias = np.zeros(num_rows)
        for feature, feature_ranks in enumerate(ranks):
            latents = self._latents(feature, feature_ranks)
            owner = np.repeat(np.arange(num_rows), lengths[feature])
            # Mean pooling keeps multi-hot features on the scale of one-hot ones; empty bag -> 0.
            count = np.maximum(lengths[feature], 1)
            pooled = np.stack(
                [np.bincount(owner, latents[:, j], num_rows) / count for j in range(rank_dim + 1)],
                axis=1,
            )
            total += pooled[:, :rank_dim]
            squares += (pooled[:, :rank_dim] ** 2).sum(axis=1)
            bias += pooled[:, rank_dim]
        # Sum over feature pairs f < g of <u_f, u_g>, in O(F) instead of O(F^2).
        return 0.5 * ((total**2).sum(axis=1) - squares) + bias

    def _logits(
        self, lengths: np.ndarray, ranks: list[np.ndarray], dense: np.ndarray
    ) -> np.ndarray:
        return (
            self.config.teacher_scale * self._sparse_logits(lengths, ranks) / self._sparse_std
            + self.config.dense_weight * dense @ self._dense_direction
            + self._intercept
        )

    def _calibrate(self) -> None:
        """Fix the logit scale and the intercept (for ``positive_rate``) on a seeded sample."""
        sample = self._generate(
            np.random.default_rng([self.config.seed, 0xCA1B]), _CALIBRATION_ROWS
        )
        ranks = self._ranks(list(sample.values))
        self._sparse_std = float(np.std(self._sparse_logits(sample.lengths, ranks))) or 1.0
        noise = np.random.default_rng([self.config.seed, 0xCA1C]).standard_normal(_CALIBRATION_ROWS)
        base = (
            self._logits(sample.lengths, ranks, sample.dense.astype(np.float64))
            + self.config.noise * noise
        )
        # Bisection on the intercept: the mean predicted probability is increasing in it.
        low, high = -30.0, 30.0
        for _ in range(60):
            middle = 0.5 * (low + high)
            if np.mean(1.0 / (1.0 + np.exp(-(base + middle)))) < self.config.positive_rate:
                low = middle
            else:
                high = middle
        self._intercept = 0.5 * (low + high)
