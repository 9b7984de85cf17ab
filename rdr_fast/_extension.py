"""Where rdr_fast's C++ CPU kernels come from: the module built at install, or a JIT build.

Loading the compiled library runs its static ``TORCH_LIBRARY_IMPL`` registrations, which
take over the CPU (and autograd) kernels of the ops that ``ops.py`` defines.

Order of attempts (``docs/install.md`` explains each, with the environment variables):

1. ``rdr_fast._C``, compiled by ``pip install .``, loaded at import when the stamp beside
   it (``_C.torch_build``) names the running torch;
2. when that is missing or was built for another torch, the same ``csrc/`` sources
   compiled with ``torch.utils.cpp_extension.load`` into a cache folder per torch
   version: loaded at import when a build of these sources is already there, otherwise
   compiled at the first CPU use of an op (``compile_pending``, called by ``ops.py``),
   under a file lock so that parallel processes (torchrun) compile once;
3. else none: ``ops.py`` runs the PyTorch path on CPU and warns once with the reason.

This file imports nothing from rdr_fast, and torch only inside functions: ``setup.py``
loads it by path for the compiler flags and the stamp, without torch being importable.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.machinery
import os
import shutil
import sys
import threading
import time
from pathlib import Path

# -fopenmp: at::parallel_for's OpenMP backend is header-inline, and `omp simd` vectorises
# the kernels' reductions. -fno-trapping-math lets GCC turn float compare-selects into
# vector blends (nothing here reads FP exception flags; clang's default anyway).
# No -march=native: a wheel must run on any x86-64 / arm64 machine.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"]
LINK_FLAGS = ["-fopenmp"]

MODULE = "rdr_fast._C"
STAMP = "_C.torch_build"  # beside the installed module: the torch it was compiled against
_PACKAGE_DIR = Path(__file__).resolve().parent
_COMPILE_LOCK = threading.Lock()  # threads of one process; the file lock covers processes

_info: dict = {"origin": "none", "path": None, "reason": "rdr_fast._extension.load() has not run"}


def extension_info() -> dict:
    """Where the C++ CPU kernels came from, as ``{"origin", "path", "reason"}``.

    origin is ``"install"`` (``rdr_fast._C``, built by pip), ``"jit"`` (compiled into the
    cache; path is the library, reason says why the installed module was not used),
    ``"pending"`` (to be compiled into the cache folder ``path`` at the first CPU use of an
    op) or ``"none"`` (the PyTorch path runs on CPU; reason says why).
    """
    return dict(_info)


def torch_build() -> str:
    """The running torch, as the stamp names it: version and commit (source builds)."""
    import torch

    return f"{torch.__version__} {torch.version.git_version}"


def load() -> None:
    """At import: load the installed module, or an up-to-date JIT build from the cache, or
    leave the compile for the first CPU use of an op; record which in ``extension_info()``.
    Never raises: failures become the recorded reason."""
    impl = os.environ.get("RDR_FAST_IMPL", "").strip().lower()
    if impl in ("torch", "reference"):
        # A C++ kernel loaded now would take over the Python one this setting asks for.
        _info.update(origin="none", path=None, reason=f"RDR_FAST_IMPL={impl} selects a Python path")
        return
    if _switched_off("RDR_FAST_BUILD_CPP"):
        _info.update(origin="none", path=None, reason="RDR_FAST_BUILD_CPP=0 turns the C++ kernels off")
        return
    installed_error = _load_installed()
    if installed_error is None:
        _info.update(origin="install", path=sys.modules[MODULE].__file__, reason=None)
        return
    if _switched_off("RDR_FAST_JIT"):
        _info.update(origin="none", path=None, reason=f"{installed_error}; RDR_FAST_JIT=0 turns off compiling it")
        return
    try:
        library = _load_jit(compile_if_needed=False)
    except Exception as err:  # noqa: BLE001 — no torch sources, unreadable cache...
        _info.update(origin="none", path=None, reason=f"{installed_error}; the JIT build is impossible ({err})")
        return
    if library is None:
        _info.update(origin="pending", path=str(cache_dir()), reason=installed_error)
    else:
        _info.update(origin="jit", path=str(library), reason=installed_error)


def compile_pending() -> bool:
    """Compile and load the kernels that ``load()`` left pending (the first CPU use of an
    op calls this); True when the C++ kernels are registered afterwards."""
    with _COMPILE_LOCK:
        if _info["origin"] != "pending":
            return _info["origin"] in ("install", "jit")
        installed_error = _info["reason"]
        try:
            library = _load_jit(compile_if_needed=True)
        except Exception as err:  # noqa: BLE001 — no compiler, build error, read-only cache...
            _info.update(origin="none", path=None,
                         reason=f"{installed_error}; compiling it failed ({type(err).__name__}: {err})")
            return False
        _info.update(origin="jit", path=str(library), reason=installed_error)
        return True


def _switched_off(variable: str) -> bool:
    return os.environ.get(variable, "1").strip() == "0"


def _load_installed() -> str | None:
    """Import rdr_fast._C when it was built for the running torch; None when it loaded,
    else why not. The stamp is read first: a module built for another torch may load
    without an error and then misbehave, and once loaded its kernels cannot be removed."""
    # Only this package's own folder: an editable install of another checkout, visible
    # through the system site-packages, would otherwise bring its _C (built from its sources).
    if importlib.machinery.PathFinder.find_spec(MODULE, [str(_PACKAGE_DIR)]) is None:
        return f"{MODULE} was not built at install"
    stamp = _PACKAGE_DIR / STAMP
    built_for = stamp.read_text().strip() if stamp.is_file() else "an unknown torch (no stamp)"
    if built_for != torch_build():
        return f"{MODULE} was built for torch {built_for}, this is torch {torch_build()}"
    try:
        importlib.import_module(MODULE)
    except Exception as err:  # noqa: BLE001 — e.g. a broken or foreign build: undefined symbols
        return f"loading {MODULE} failed ({type(err).__name__}: {err})"
    return None


def sources_dir() -> Path:
    """The csrc/ sources: shipped in the wheel as rdr_fast/csrc/, or the source tree's
    csrc/ beside setup.py (editable installs, running from a checkout)."""
    for candidate, marker in ((_PACKAGE_DIR / "csrc", None), (_PACKAGE_DIR.parent / "csrc", "setup.py")):
        if any(candidate.glob("*.cpp")) and (marker is None or (candidate.parent / marker).is_file()):
            return candidate
    raise FileNotFoundError(f"no csrc/ sources next to {_PACKAGE_DIR}")


def cache_dir() -> Path:
    """One folder per torch version and Python: ``$RDR_FAST_CACHE`` (default
    ``$XDG_CACHE_HOME/rdr_fast``, i.e. ``~/.cache/rdr_fast``) / ``torch-<version>-<python>``."""
    import torch

    root = os.environ.get("RDR_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "rdr_fast")
    return Path(root) / f"torch-{torch.__version__}-{sys.implementation.cache_tag}"


def _build_key(sources: Path) -> str:
    """Hash of everything the library depends on besides the folder's torch and Python:
    the sources, the flags, the compiler asked for, the torch commit (source builds)."""
    import torch

    digest = hashlib.sha256(repr((CXX_FLAGS, LINK_FLAGS, os.environ.get("CXX"), torch.version.git_version)).encode())
    for path in sorted(sources.glob("*.[ch]*")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _load_jit(compile_if_needed: bool) -> Path | None:
    """Load the cached build of csrc/ when it is up to date, compiling it first if
    ``compile_if_needed``; None when it is not built and not to be compiled now."""
    import torch

    sources = sources_dir()
    folder = cache_dir()
    library, stamp, failure = folder / "_C.so", folder / "_C.sha256", folder / "_C.failed"
    key = _build_key(sources)

    def built() -> bool:
        return library.is_file() and stamp.is_file() and stamp.read_text() == key

    if not built():
        if not compile_if_needed:
            return None
        folder.mkdir(parents=True, exist_ok=True)
        with _file_lock(folder / "build.lock"):  # the first process compiles, the others wait
            if failure.is_file() and failure.read_text().split("\n", 1)[0] == key:
                raise RuntimeError(f"an earlier compile of these sources failed; its log is {failure} "
                                   "(delete that file to try again)")
            if not built():
                _compile(sources, folder, key, stamp, failure)
    torch.ops.load_library(str(library))
    return library


def _compile(sources: Path, folder: Path, key: str, stamp: Path, failure: Path) -> None:
    import torch

    compiler = os.environ.get("CXX", "c++").split()[0]
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler: {compiler!r} is not on PATH (set CXX to use another)")
    print(f"rdr_fast: compiling the C++ CPU kernels for torch {torch.__version__} into {folder} "
          "(once per torch version, 1-2 minutes)...", file=sys.stderr, flush=True)
    start = time.monotonic()
    from torch.utils import cpp_extension

    (folder / "lock").unlink(missing_ok=True)  # older torch: a lock file that blocks while it exists
    try:
        with _ninja_on_path():
            cpp_extension.load("_C", sorted(str(p) for p in sources.glob("*.cpp")), extra_cflags=CXX_FLAGS,
                               extra_ldflags=LINK_FLAGS, build_directory=str(folder), is_python_module=False)
    except Exception as err:
        failure.write_text(f"{key}\n{type(err).__name__}: {err}\n")
        raise RuntimeError(f"the build failed, its log is {failure}") from err
    stamp.write_text(key)
    failure.unlink(missing_ok=True)
    print(f"rdr_fast: compiled the C++ CPU kernels in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock that the OS drops when its holder dies (unlike torch's lock file)."""
    import fcntl  # POSIX; elsewhere the JIT build fails with this ImportError as its reason

    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _ninja_on_path():
    """torch runs ``ninja`` from PATH. The ninja package (a dependency) puts it beside this
    interpreter, which is not on PATH in a virtual environment that was not activated."""
    old_path = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:
        os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), old_path])
    try:
        yield
    finally:
        os.environ["PATH"] = old_path
