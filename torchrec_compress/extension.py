"""The optional C++ extension, ``torchrec_compress._C``, loaded once for every method.

Loading it registers the operators of the ``torchrec_compress`` namespace (product-quantized and
low-rank pooled lookups, PQ encoding); each method's ``kernels`` module registers the autograd
formulas and fake (meta) implementations of its own operators and says when they apply.
Without the extension (``HAS_KERNELS`` false) every method keeps its pure-torch path.

Example::

    >>> isinstance(HAS_KERNELS, bool)
    True
"""

try:
    import torchrec_compress._C  # noqa: F401  (loading it registers the operators)

    HAS_KERNELS = True
except ImportError:
    HAS_KERNELS = False
