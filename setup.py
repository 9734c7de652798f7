"""Builds the optional C++ kernels (``torchrec_compress._C``); all metadata lives in pyproject.toml.

The extension needs torch at build time, so it is built by ``pip install --no-build-isolation``
(what ``make venv`` runs).  Without torch in the build environment, or without a working C++
compiler, the package installs without it and uses its pure-torch code paths.
"""

import platform
import sys

from setuptools import setup

SOURCES = [
    "torchrec_compress/csrc/pq_ops.cpp",
    "torchrec_compress/csrc/pq_kernels.cpp",
    "torchrec_compress/csrc/huge_pages.cpp",
]


def _extension_setup() -> dict[str, object]:
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("torchrec-compress: torch not importable, C++ kernels skipped", file=sys.stderr)
        return {}

    class OptionalBuildExtension(BuildExtension):
        """Reports a failed compile and installs the pure-torch paths instead of failing."""

        def build_extension(self, ext: object) -> None:
            try:
                super().build_extension(ext)
            except Exception as error:  # noqa: BLE001 - any compiler failure means "no kernels"
                print(f"torchrec-compress: C++ kernels not built ({error})", file=sys.stderr)

    # x86-64-v2 is the baseline every supported CPU runs; AVX2 code paths are chosen at runtime.
    arch = ["-march=x86-64-v2"] if platform.machine() in ("x86_64", "AMD64") else []
    extension = CppExtension(
        "torchrec_compress._C",
        SOURCES,
        extra_compile_args=["-O3", "-fopenmp", *arch],
        extra_link_args=["-fopenmp"],
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": OptionalBuildExtension}}


setup(**_extension_setup())
