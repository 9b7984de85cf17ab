"""PEP 517 build backend: setuptools, building the C++ kernels against the torch of the
environment that pip installs into (pyproject.toml names it with ``backend-path``).

Why: pip builds in an isolated environment that holds only the build requirements, so
setup.py could not import the installed torch, and ``pip install .`` made a wheel without
``rdr_fast._C``. Listing torch among the build requirements would not fix that: pip
would install a second torch (by default the newest CUDA wheel from PyPI, gigabytes),
possibly another version or build than the one that runs the kernels.

What: every hook first appends the target interpreter's own ``sys.path`` (asked from a
subprocess that ignores pip's isolating environment variables) after the isolated
environment's entries. The build requirements (setuptools, wheel, ninja) still come from
the isolated environment; torch and its dependencies come from where they are installed,
whatever index or source build they came from. Only when the target environment has no
torch at all is ``torch>=2.4`` requested as a build requirement, so that the wheel still
carries kernels (built against the torch pip then picks, normally the same one it installs
next; a mismatch is caught by the stamp beside the module, and the kernels are compiled
again at the first CPU use of an op: rdr_fast/_extension.py).
"""
import importlib.util
import json
import os
import subprocess
import sys

from setuptools import build_meta
from setuptools.build_meta import *  # noqa: F401,F403 — every hook not wrapped below

TORCH_REQUIREMENT = "torch>=2.4"  # the same range as [project] dependencies


def _target_sys_path() -> list:
    """sys.path of this interpreter outside pip's build environment: -E drops the
    PYTHONPATH (pip's isolating sitecustomize) and PYTHONNOUSERSITE that pip sets."""
    code = "import json, sys; print(json.dumps(sys.path))"
    done = subprocess.run([sys.executable, "-E", "-c", code], capture_output=True, text=True, check=True)
    return [entry for entry in json.loads(done.stdout) if entry and os.path.abspath(entry) != os.getcwd()]


sys.path.extend(entry for entry in _target_sys_path() if entry not in sys.path)


def _torch_missing() -> bool:
    return (os.environ.get("RDR_FAST_BUILD_CPP", "1").strip() != "0"
            and importlib.util.find_spec("torch") is None)


def get_requires_for_build_wheel(config_settings=None):
    return build_meta.get_requires_for_build_wheel(config_settings) + ([TORCH_REQUIREMENT] if _torch_missing() else [])


def get_requires_for_build_editable(config_settings=None):
    return build_meta.get_requires_for_build_editable(config_settings) + (
        [TORCH_REQUIREMENT] if _torch_missing() else [])
