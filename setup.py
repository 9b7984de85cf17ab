"""Build rdr_fast. The top-level kernels/ folder ships as rdr_fast.kernels and csrc/ as
rdr_fast/csrc/ (the sources of the just-in-time build, rdr_fast/_extension.py).

The C++ CPU kernels in csrc/ compile into ``rdr_fast._C`` against the torch of the
environment being installed into: plain ``pip install .`` sees it through the in-tree
build backend (build_backend.py; docs/install.md). The extension is optional: with
``RDR_FAST_BUILD_CPP=0``, without torch at build time, or when the compiler is missing
or fails, the install still succeeds (with a warning) and rdr_fast compiles the kernels
at the first CPU use of an op instead, or runs its PyTorch path.
"""
import glob
import os
import runpy
import warnings

from setuptools import find_packages, setup

# kernels/ and csrc/ live at the top level and are mapped in by PACKAGE_DIR (the
# rdr_fast/kernels symlink of a development checkout must not count twice).
PACKAGES = find_packages(include=["rdr_fast", "rdr_fast.*"], exclude=["rdr_fast.kernels"]) + [
    "rdr_fast.kernels", "rdr_fast.csrc"]
PACKAGE_DIR = {"rdr_fast": "rdr_fast", "rdr_fast.kernels": "kernels", "rdr_fast.csrc": "csrc"}
PACKAGE_DATA = {"rdr_fast.csrc": ["*.cpp", "*.h"]}


# The one module that also drives the just-in-time build: compiler flags and the stamp.
# Loaded by path: importing the rdr_fast package would import torch and the ops.
EXTENSION = runpy.run_path(os.path.join("rdr_fast", "_extension.py"))


def _cpp_extension_kwargs() -> dict:
    """ext_modules and cmdclass for rdr_fast._C, or {} when it is not to be built."""
    if os.environ.get("RDR_FAST_BUILD_CPP", "1").strip() == "0":
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as err:
        warnings.warn(f"rdr_fast: torch is not importable at build time ({err}); skipping the C++ "
                      "kernels (rdr_fast compiles them at the first CPU use of an op instead).")
        return {}

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension that warns instead of failing. `optional=True` is not enough:
        torch's ninja build raises past it."""

        def run(self):
            inplace = self.inplace
            try:
                super().run()
                self._write_stamps()
            except Exception as err:  # noqa: BLE001 — any toolchain failure means "no C++"
                self.inplace = inplace
                self.extensions = []  # nothing to install or link for editable mode
                warnings.warn(f"rdr_fast: building the C++ kernels failed ({type(err).__name__}: {err}); "
                              "installing without them, rdr_fast will compile them at the first CPU use of an op.")

        def _write_stamps(self):
            """The torch each module was compiled against, beside it: rdr_fast loads the
            module only under that torch (another one may load it and misbehave)."""
            for ext in self.extensions:
                module = self.get_ext_fullpath(ext.name)
                with open(os.path.join(os.path.dirname(module), EXTENSION["STAMP"]), "w") as stamp:
                    stamp.write(EXTENSION["torch_build"]())

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    ext = CppExtension("rdr_fast._C", sources, extra_compile_args={"cxx": EXTENSION["CXX_FLAGS"]},
                       extra_link_args=EXTENSION["LINK_FLAGS"])
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension}}


setup(packages=PACKAGES, package_dir=PACKAGE_DIR, package_data=PACKAGE_DATA, **_cpp_extension_kwargs())
