"""What every method shares once process groups are involved: the EBC and FPEBC sharders
(``embeddingbag``, ``fp_embeddingbag``), planning (``planning``), row layouts and shard I/O
(``tables``, ``state``), unsharded skeletons (``skeleton``), in-backward optimizers
(``in_backward``), and, above the methods, the sharded driver and its checkpoints
(``compression``).

Each method's own sharded modules and sharders live in its folder
(``torchrec_compress/methods/<name>/sharded.py``), next to its unsharded modules, as in TorchRec
each sharded module lives next to its sharder.  This package imports nothing itself, so that
importing one of its modules never imports a driver; the public names are importable from
``torchrec_compress``.
"""
