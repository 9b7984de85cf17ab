"""Build rdr_fast. The top-level kernels/ folder ships as rdr_fast.kernels.

The C++ CPU kernels in csrc/ compile into ``rdr_fast._C`` against the installed torch,
so install with ``pip install --no-build-isolation``. The extension is optional: with
``RDR_FAST_BUILD_CPP=0``, without torch at build time, or when the compiler is missing
or fails, the install still succeeds (with a warning) and rdr_fast runs its PyTorch path.
"""
import glob
import os
import warnings

from setuptools import find_packages, setup

PACKAGES = find_packages(include=["rdr_fast", "rdr_fast.*"]) + ["rdr_fast.kernels"]
PACKAGE_DIR = {"rdr_fast": "rdr_fast", "rdr_fast.kernels": "kernels"}


def _cpp_extension_kwargs() -> dict:
    """ext_modules and cmdclass for rdr_fast._C, or {} when it is not to be built."""
    if os.environ.get("RDR_FAST_BUILD_CPP", "1").strip() == "0":
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as err:  # e.g. pip's build isolation hides the installed torch
        warnings.warn(f"rdr_fast: torch is not importable at build time ({err}); skipping the C++ "
                      "kernels. Install with --no-build-isolation to build them.")
        return {}

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension that warns instead of failing. `optional=True` is not enough:
        torch's ninja build raises past it (STYLE §7)."""

        def run(self):
            inplace = self.inplace
            try:
                super().run()
            except Exception as err:  # noqa: BLE001 — any toolchain failure means "no C++"
                self.inplace = inplace
                self.extensions = []  # nothing to install or link for editable mode
                warnings.warn(f"rdr_fast: building the C++ kernels failed ({type(err).__name__}: {err}); "
                              "installing without them, rdr_fast will use its PyTorch path.")

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # -fopenmp: at::parallel_for's OpenMP backend is header-inline, and `omp simd` vectorises
    # the kernels' reductions. -fno-trapping-math lets GCC turn float compare-selects into
    # vector blends (nothing here reads FP exception flags; clang's default anyway).
    # No -march=native: the build must run on any x86-64 / arm64 machine.
    flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
    ext = CppExtension("rdr_fast._C", sources, extra_compile_args={"cxx": flags}, extra_link_args=["-fopenmp"])
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension}}


setup(packages=PACKAGES, package_dir=PACKAGE_DIR, **_cpp_extension_kwargs())
