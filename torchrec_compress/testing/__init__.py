"""Test utilities shared by the project's tests and by users testing their own sharded models."""

from torchrec_compress.testing.memory import peak_cpu_allocation
from torchrec_compress.testing.multiprocess import run_multiprocess

__all__ = ["peak_cpu_allocation", "run_multiprocess"]
