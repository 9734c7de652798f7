"""Unsharded product-quantized EmbeddingBagCollection (MEC): uint8 codes + trainable codebooks.

A row ``i`` of a table is ``concat_m codebooks[m][codes[i, m]]``.  Pooling is exact per subspace,
``sum_{i in S} concat_m C_m[c_m(i)] = concat_m sum_{i in S} C_m[c_m(i)]``, so a pooled lookup of one
feature is a single ``embedding_bag`` over the ``M * K`` stacked codewords (``[M * K, dsub]``) with
``B * M`` bags laid out subspace-major ``(m, b)``: the flat indices are ``codes[ids, m] + m * K``,
bag ``(m, b)`` holds the ids of bag ``b`` and the result ``[M, B, dsub]`` is one transpose away
from ``[B, d]``.  The tiny codebook (``M * K * dsub`` floats) stays in cache, so the only random
memory traffic is ``M`` bytes of codes per id instead of ``d`` floats.
"""

import warnings
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.compiler import is_compiling
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollectionInterface,
    get_embedding_names_by_table,
    process_pooled_embeddings,
    reorder_inverse_indices,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_compress.guards import FeatureIdRanges
from torchrec_compress.methods.pq.lookup import pq_pooled_lookup
from torchrec_compress.methods.pq.quantizer import code_dtype, decode

# TorchRec's own helpers are fx leaves only where TorchRec calls them: make them leaves here too
# (their bodies iterate over names and test sizes, which a symbolic trace cannot do).
torch.fx.wrap("reorder_inverse_indices")
torch.fx.wrap("process_pooled_embeddings")


@torch.fx.wrap
def pq_feature_lookup(
    codes: Tensor,
    codebooks: Tensor,
    ids: Tensor,
    offsets: Tensor,
    per_sample_weights: Tensor | None,
    mean: bool,
) -> Tensor:
    """Pooled PQ lookup of one feature, SUM or MEAN (empty bags give zeros either way), float32
    whatever the codebooks' type, like TorchRec's ``EmbeddingBagCollection``.

    A leaf of ``torch.fx`` traces (``torchrec.fx.symbolic_trace``) and TorchScript-compatible,
    so a traced model keeps the C++ kernel and can be scripted.

    Args:
        codes (Tensor): ``[N, M]`` integer codes of the table.
        codebooks (Tensor): ``[M, K, dsub]``.
        ids (Tensor): ``[n]`` row ids of all bags, concatenated.
        offsets (Tensor): ``[B + 1]`` bag boundaries in ``ids``.
        per_sample_weights (Optional[Tensor]): ``[n]`` weight of each id.
        mean (bool): divide each bag by its length (``PoolingType.MEAN``).

    Example::

        >>> books = torch.arange(8.0).view(2, 2, 2)  # M=2, K=2, dsub=2
        >>> codes = torch.tensor([[0, 1], [1, 0]], dtype=torch.uint8)
        >>> pq_feature_lookup(codes, books, torch.tensor([0, 1, 1]), torch.tensor([0, 2, 2, 3]),
        ...                   None, mean=True)
        tensor([[1., 2., 5., 6.],
                [0., 0., 0., 0.],
                [2., 3., 4., 5.]])
    """
    pooled = pq_pooled_lookup(codes, codebooks, ids, offsets, per_sample_weights).float()
    if mean:
        lengths = (offsets[1:] - offsets[:-1]).clamp(min=1)
        pooled = pooled / lengths.unsqueeze(1).to(pooled.dtype)
    return pooled


@torch.fx.wrap
def rows_feature_lookup(
    rows: Tensor, ids: Tensor, offsets: Tensor, per_sample_weights: Tensor | None, mean: bool
) -> Tensor:
    """Pooled lookup of one feature of a table stored exactly (its codes are its row ids), SUM
    or MEAN, float32: :func:`pq_feature_lookup` without the codes.

    Args:
        rows (Tensor): ``[N, d]`` the table's rows (its one subspace's codewords).
        ids (Tensor): ``[n]`` row ids of all bags, concatenated.
        offsets (Tensor): ``[B + 1]`` bag boundaries in ``ids``.
        per_sample_weights (Optional[Tensor]): ``[n]`` weight of each id.
        mean (bool): divide each bag by its length (``PoolingType.MEAN``).

    Example::

        >>> rows_feature_lookup(torch.arange(6.0).view(3, 2), torch.tensor([0, 2, 1]),
        ...                     torch.tensor([0, 2, 3]), None, mean=False)
        tensor([[4., 6.],
                [2., 3.]])
    """
    pooled = F.embedding_bag(
        ids,
        rows,
        offsets,
        mode="sum",
        include_last_offset=True,
        per_sample_weights=None
        if per_sample_weights is None
        else per_sample_weights.to(rows.dtype),
    ).float()
    if mean:
        lengths = (offsets[1:] - offsets[:-1]).clamp(min=1)
        pooled = pooled / lengths.unsqueeze(1).to(pooled.dtype)
    return pooled


def _is_identity(codes: Tensor, ksub: int) -> bool:
    """Whether ``[N, 1]`` codes over ``ksub == N`` codewords are the row ids (a table stored
    exactly); ``False`` on ``meta`` (nothing to compare)."""
    n = codes.shape[0]
    if codes.dim() != 2 or codes.shape[1] != 1 or ksub != n or codes.device.type == "meta":
        return False
    return bool(torch.equal(codes[:, 0].long(), torch.arange(n, device=codes.device)))


class _Codes(nn.Module):
    """The ``codes.<table>`` buffers of a :class:`PQEmbeddingBagCollection`.

    A table stored exactly (one subspace whose ``N`` codewords are its rows) holds no codes:
    its codes are its row ids, made when read (``getattr(collection.codes, name)``, e.g. by the
    sharder), so it takes no more bytes than its rows.
    """

    def __init__(self, codebooks: nn.ParameterDict) -> None:
        super().__init__()
        # plain attributes (not a submodule: the codebooks are the collection's)
        self.__dict__["_codebooks"] = codebooks
        self.__dict__["exact"] = set()

    def __getattr__(self, name: str) -> Any:
        if name in self.__dict__.get("exact", ()):
            books = self.__dict__["_codebooks"][name]  # one subspace: [N, d], its rows
            ids = torch.arange(books.shape[0], device=books.device)
            return ids.to(code_dtype(books.shape[0])).unsqueeze(1)
        return super().__getattr__(name)


class PQEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """Drop-in for TorchRec's ``EmbeddingBagCollection`` whose tables are product-quantized.

    Every table keeps its ``EmbeddingBagConfig`` (original ``num_embeddings`` and
    ``embedding_dim``); its rows are ``codes`` (a persistent buffer ``codes.<table>`` of shape
    ``[num_embeddings, M]``, ``uint8`` for ``K <= 256``, frozen) and ``codebooks`` (a trainable
    parameter ``codebooks.<table>``, ``[M * K, embedding_dim / M]``: a row per codeword, so
    that row-wise optimizers such as TorchRec's ``RowWiseAdagrad`` apply, as to any table;
    :meth:`codebook` is its ``[M, K, embedding_dim / M]`` view, and state dicts hold that
    view, as they did when the parameter was 3-D).  The output
    ``KeyedTensor`` has the keys, dims and order of the ``EmbeddingBagCollection`` built from the
    same configs, and equals its output when that EBC's weights are the decoded tables (SUM and
    MEAN pooling, weighted features, empty bags).  Loading a state dict whose codes are out of
    ``[0, K)`` raises an error naming the table.  The forward traces like the EBC's
    (``torchrec.fx.symbolic_trace`` then ``torch.jit.script``, ``torch.export``,
    ``torch.compile(fullgraph=True)``), each feature's lookup one :func:`pq_feature_lookup` call.
    Run unsharded in a job of several processes (``DistributedModelParallel`` without
    ``PQEmbeddingBagCollectionSharder``), it warns once: every process would hold all the codes.
    Pooled outputs are float32 whatever the codebooks' type, like TorchRec's collection.

    A table stored exactly (its rows as the ``N`` codewords of one subspace, codes ``0..N-1``,
    how ``compress_`` keeps a table that quantization would not shrink) holds no codes: it
    takes the bytes of its rows alone and is pooled straight from them.  State dicts still
    carry its identity codes (``codes.<table>``), so they load into a sharded collection.

    Args:
        tables (List[EmbeddingBagConfig]): the original table configs.
        codes (Dict[str, Tensor]): ``[num_embeddings, M]`` integer codes per table name.
        codebooks (Dict[str, Tensor]): ``[M, K, embedding_dim / M]`` codebooks per table name.
        is_weighted (bool): features carry per-id weights (as in ``EmbeddingBagCollection``).

    Example::

        >>> from torchrec.modules.embedding_configs import EmbeddingBagConfig
        >>> from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        >>> table = EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=3, feature_names=["f"])
        >>> codes = torch.tensor([[0, 1], [1, 1], [0, 0]], dtype=torch.uint8)
        >>> ebc = PQEmbeddingBagCollection([table], {"t": codes}, {"t": torch.ones(2, 2, 2)})
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.tensor([0, 1, 2]), torch.tensor([2, 1]))
        >>> ebc(kjt).to_dict()["f"]
        tensor([[2., 2., 2., 2.],
                [1., 1., 1., 1.]], grad_fn=<SplitWithSizesBackward0>)
    """

    # its output keys are in table order (what a low-rank collection holding it as its factor
    # collection reads)
    keys_in_table_order = True

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        codes: dict[str, Tensor],
        codebooks: dict[str, Tensor],
        is_weighted: bool = False,
    ) -> None:
        super().__init__()
        self._is_weighted = is_weighted
        self._embedding_bag_configs = tables
        codebooks_dict = nn.ParameterDict()
        self.codes = _Codes(codebooks_dict)  # registered first: codes.* before codebooks.*
        self.codebooks = codebooks_dict
        self._subspaces: dict[str, int] = {}  # M of each table
        seen: set[str] = set()
        for table in tables:
            if table.name in seen:
                raise ValueError(f"Duplicate table name {table.name}")
            seen.add(table.name)
            if table.name not in codes or table.name not in codebooks:
                raise ValueError(f"table {table.name!r}: codes and codebooks are both required")
            books = codebooks[table.name]
            if books.dim() != 3 or books.shape[0] * books.shape[2] != table.embedding_dim:
                raise ValueError(
                    f"table {table.name!r}: codebooks must be [M, K, {table.embedding_dim} / M], "
                    f"got {list(books.shape)}"
                )
            table_codes = codes[table.name]
            _check_codes(
                table.name, table_codes, table.num_embeddings, books.shape[0], books.shape[1]
            )
            self._subspaces[table.name] = books.shape[0]
            rows = books.detach().float().reshape(-1, books.shape[2])
            self.codebooks[table.name] = nn.Parameter(rows.clone())
            if _is_identity(table_codes, books.shape[1]):
                self.codes.exact.add(table.name)
            else:
                self.codes.register_buffer(
                    table.name, table_codes.to(code_dtype(books.shape[1])).contiguous()
                )
            if not table.feature_names:
                table.feature_names = [table.name]
        self._pooling_is_mean = [t.pooling == PoolingType.MEAN for t in tables]
        self._feature_names: list[list[str]] = [t.feature_names for t in tables]
        self._embedding_names: list[str] = [
            name for names in get_embedding_names_by_table(tables) for name in names
        ]
        self._lengths_per_embedding: list[int] = [
            t.embedding_dim for t in tables for _ in t.feature_names
        ]
        self.register_load_state_dict_pre_hook(self._check_loaded_codes)
        self._register_load_state_dict_pre_hook(
            partial(codebook_rows_in_state, self._subspaces), with_module=False
        )
        self.register_state_dict_post_hook(_identity_codes_of_exact_tables)
        self.register_state_dict_post_hook(partial(_codebooks_in_state_hook, self._subspaces))
        self._replication_checked = False
        self._id_ranges = FeatureIdRanges(tables)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled lookups of every feature: a ``KeyedTensor`` ``[B, sum of dims]``.

        Args:
            features (KeyedJaggedTensor): ids (and weights when ``is_weighted``) per feature.
        """
        if not (is_fx_symbolic_tracing() or is_compiling()):
            self._id_ranges.check(features)  # naming table, feature and id
            if not self._replication_checked:
                self._warn_if_replicated()
        flat_feature_names = [name for names in self._feature_names for name in names]
        inverse_indices = reorder_inverse_indices(
            inverse_indices=features.inverse_indices_or_none(),
            feature_names=flat_feature_names,
        )
        feature_dict = features.to_dict()
        pooled: list[Tensor] = []
        for table, names, mean in zip(
            self._embedding_bag_configs, self._feature_names, self._pooling_is_mean, strict=True
        ):
            books = self.codebook(table.name)
            exact = table.name in self.codes.exact
            table_codes = None if exact else getattr(self.codes, table.name)
            for name in names:
                feature = feature_dict[name]
                weights = feature.weights() if self._is_weighted else None
                if table_codes is None:
                    pooled.append(
                        rows_feature_lookup(
                            books[0], feature.values(), feature.offsets(), weights, mean
                        )
                    )
                    continue
                pooled.append(
                    pq_feature_lookup(
                        table_codes, books, feature.values(), feature.offsets(), weights, mean
                    )
                )
        return KeyedTensor(
            keys=self._embedding_names,
            values=process_pooled_embeddings(pooled, inverse_indices),
            length_per_key=self._lengths_per_embedding,
        )

    def _warn_if_replicated(self) -> None:
        """Warns once when this module runs unsharded in a multi-process job.

        That is what ``DistributedModelParallel`` leaves when it was not given
        ``PQEmbeddingBagCollectionSharder``: it walks into the module, finds nothing to shard, and
        every process then holds (and DDP broadcasts) all the codes.
        """
        self._replication_checked = True
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        code_bytes = sum(c.numel() * c.element_size() for c in self.codes.buffers())
        warnings.warn(
            f"PQEmbeddingBagCollection with tables {[t.name for t in self._embedding_bag_configs]} "
            f"runs unsharded in a job of {dist.get_world_size()} processes: every process holds "
            f"all {code_bytes} bytes of its codes. To shard them, pass "
            "PQEmbeddingBagCollectionSharder to DistributedModelParallel (sharders="
            "torchrec_compress.distributed.planning.default_sharders() includes it).",
            stacklevel=2,
        )

    def __getattr__(self, name: str) -> Any:
        if name == "embedding_bags":
            # TorchRec code written for the EBC (e.g. its FPEBC sharder) reads this attribute.
            raise AttributeError(
                f"PQEmbeddingBagCollection (tables "
                f"{[t.name for t in self._embedding_bag_configs]}) has no embedding_bags: its "
                "tables are codes and codebooks. To shard a FeatureProcessedEmbeddingBagCollection "
                "over it, pass torchrec_compress.methods.pq.sharded."
                "PQFeatureProcessedEmbeddingBagCollectionSharder in place of TorchRec's "
                "FeatureProcessedEmbeddingBagCollectionSharder"
            )
        return super().__getattr__(name)

    def codebook(self, table_name: str) -> Tensor:
        """Table ``table_name``'s codebooks as ``[M, K, dsub]`` (a view of its parameter)."""
        return codebook_view(self.codebooks[table_name], self._subspaces[table_name])

    def decoded_weight(self, table_name: str) -> Tensor:
        """The ``[num_embeddings, embedding_dim]`` float table the codes stand for."""
        if table_name in self.codes.exact:
            return self.codebooks[table_name]
        return decode(getattr(self.codes, table_name), self.codebook(table_name))

    def stored_exactly(self) -> list[str]:
        """The tables stored exactly: their rows alone, no codes (see the class notes)."""
        return [t.name for t in self._embedding_bag_configs if t.name in self.codes.exact]

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """The original table configs."""
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        """Whether features carry per-id weights."""
        return self._is_weighted

    @property
    def device(self) -> torch.device:
        return next(iter(self.codebooks.values())).device

    def _check_loaded_codes(
        self,
        module: nn.Module,
        state_dict: dict[str, Tensor],
        prefix: str,
        *args: object,
    ) -> None:
        for table in self._embedding_bag_configs:
            key = f"{prefix}codes.{table.name}"
            if key not in state_dict:
                continue
            books = self.codebook(table.name)
            value = state_dict[key]
            _check_codes(table.name, value, table.num_embeddings, books.shape[0], books.shape[1])
            # codes decide whether a table is stored exactly; identity codes are not kept
            if _is_identity(value, books.shape[1]):
                del state_dict[key]
                if table.name not in self.codes.exact:
                    delattr(self.codes, table.name)
                    self.codes.exact.add(table.name)
            elif table.name in self.codes.exact:
                self.codes.exact.discard(table.name)
                dtype = code_dtype(books.shape[1])
                self.codes.register_buffer(
                    table.name, torch.empty(value.shape, dtype=dtype, device=books.device)
                )


def codebook_view(rows: Tensor, num_subspaces: int) -> Tensor:
    """``[M * K, dsub]`` codebook rows as ``[M, K, dsub]`` (a view)."""
    return rows.view(num_subspaces, -1, rows.shape[-1])


def codebooks_in_state(subspaces: dict[str, int], state_dict: dict[str, Any], prefix: str) -> None:
    """State dicts hold every table's codebooks as ``[M, K, dsub]`` (views of the parameters)."""
    for name, num_subspaces in subspaces.items():
        key = f"{prefix}codebooks.{name}"
        if key in state_dict and state_dict[key].dim() == 2:
            state_dict[key] = codebook_view(state_dict[key], num_subspaces)


def _codebooks_in_state_hook(
    subspaces: dict[str, int], module: nn.Module, state_dict: dict[str, Any], prefix: str, _: object
) -> None:
    codebooks_in_state(subspaces, state_dict, prefix)


def codebook_rows_in_state(
    subspaces: dict[str, int], state_dict: dict[str, Any], prefix: str, *args: object
) -> None:
    """Loads ``[M, K, dsub]`` codebooks into the ``[M * K, dsub]`` parameters."""
    for name in subspaces:
        key = f"{prefix}codebooks.{name}"
        value = state_dict.get(key)
        if isinstance(value, Tensor) and value.dim() == 3:
            state_dict[key] = value.reshape(-1, value.shape[2])


def _identity_codes_of_exact_tables(
    module: PQEmbeddingBagCollection, state_dict: dict[str, Any], prefix: str, _: object
) -> None:
    """State dicts carry ``codes.<table>`` for every table, in table order, those stored exactly
    included (their row ids), so that they load into a sharded collection as before."""
    if not module.codes.exact:
        return
    codes = {
        f"{prefix}codes.{t.name}": state_dict.get(f"{prefix}codes.{t.name}")
        for t in module.embedding_bag_configs()
    }
    for name in module.codes.exact:
        codes[f"{prefix}codes.{name}"] = getattr(module.codes, name)
    rest = [(k, v) for k, v in state_dict.items() if k not in codes]
    first = next((i for i, (k, _) in enumerate(rest) if k.startswith(prefix)), len(rest))
    state_dict.clear()
    state_dict.update(rest[:first])
    state_dict.update(codes)
    state_dict.update(rest[first:])


def _check_codes(
    table_name: str, codes: Tensor, num_embeddings: int, num_subspaces: int, ksub: int
) -> None:
    if codes.shape != (num_embeddings, num_subspaces):
        raise ValueError(
            f"table {table_name!r}: codes must be [{num_embeddings}, {num_subspaces}], "
            f"got {list(codes.shape)}"
        )
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"table {table_name!r}: codes must be integers, got {codes.dtype}")
    if codes.numel() > 0 and codes.device.type != "meta":
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= ksub:
            raise ValueError(
                f"table {table_name!r}: codes must lie in [0, {ksub}) (K={ksub} codewords), "
                f"found values in [{low}, {high}]"
            )
