"""Product quantization (MEC): quantizer, training and quality metrics, free of distribution code."""

from torchrec_compress.methods.pq.fitting import fit_quantizer, train_mec, train_pq_table
from torchrec_compress.methods.pq.metrics import (
    QuantizationMetrics,
    codebook_perplexity,
    distinct_code_tuples,
    reconstruction_mse,
)
from torchrec_compress.methods.pq.quantizer import (
    ProductQuantizer,
    assign,
    balanced_subspaces,
    code_dtype,
    decode,
)
from torchrec_compress.methods.pq.training import (
    MECQuantizer,
    MECStep,
    RowSampler,
    row_weights,
    stratified_rows,
    subspace_order,
)

__all__ = [
    "MECQuantizer",
    "MECStep",
    "ProductQuantizer",
    "QuantizationMetrics",
    "RowSampler",
    "assign",
    "balanced_subspaces",
    "code_dtype",
    "codebook_perplexity",
    "decode",
    "distinct_code_tuples",
    "fit_quantizer",
    "reconstruction_mse",
    "row_weights",
    "stratified_rows",
    "subspace_order",
    "train_mec",
    "train_pq_table",
]
