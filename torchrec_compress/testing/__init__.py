"""Test utilities shared by the project's tests and by users testing their own sharded models."""

from torchrec_compress.testing.multiprocess import run_multiprocess

__all__ = ["run_multiprocess"]
