"""torchrec-compress: make TorchRec recommendation models smaller and faster.

Low-rank (AFM, SVD) and product-quantized (MEC) compression of embedding tables and MLP layers,
as drop-in TorchRec modules that shard through ``DistributedModelParallel``.
"""

__version__ = "0.1.0"
