"""A low-rank replacement for ``nn.Linear``: ``in -> k -> out``, no nonlinearity in between."""

from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: the product of two ``nn.Linear`` layers of rank ``rank``.

    Saves parameters when ``rank * (in_features + out_features) < in_features * out_features``.
    AFM fills it so that it reproduces the original layer's outputs projected on their top
    principal directions (exact at ``rank == out_features``); SVD from the weight's top singular
    vectors.  Both factors are ordinary ``nn.Linear`` layers, trainable like any dense layer.

    Args:
        in_features (int): input size.
        rank (int): inner size k, ``1 <= rank <= min(in_features, out_features)`` is typical
            (any positive value is accepted).
        out_features (int): output size.
        bias (bool): whether both factors carry a bias.
        device (Optional[torch.device]): where to allocate.

    Example::

        >>> layer = LowRankLinear(in_features=64, rank=8, out_features=32)
        >>> layer(torch.randn(5, 64)).shape
        torch.Size([5, 32])
        >>> sum(p.numel() for p in layer.parameters())  # 64*8+8 + 8*32+32, vs 64*32+32 = 2080
        808
    """

    def __init__(
        self,
        in_features: int,
        rank: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LowRankLinear: rank must be positive, got {rank}")
        self.down = nn.Linear(in_features, rank, bias=bias, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device)

    @property
    def in_features(self) -> int:
        return self.down.in_features

    @property
    def out_features(self) -> int:
        return self.up.out_features

    @property
    def rank(self) -> int:
        return self.down.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))
