"""Installing rdr_fast: ``pip install .`` builds the C++ CPU kernels, ``pip wheel .`` makes a
platform wheel carrying them, and without them (or with a module built for another torch)
the first CPU use of an op compiles them once into a cache that later processes reuse
(rdr_fast/_extension.py, docs/install.md).

The slow tests share one `pip wheel .` and one `pip install .`, each from its own clean
copy of the repository (about 3 minutes), and the just-in-time test compiles once more."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORT = ("import json, rdr_fast\n"
          "print(json.dumps({'backends': rdr_fast.backends(), 'info': rdr_fast.extension_info()}))")
# The compiled op against the PyTorch path, so "cpp" also means "runs and agrees".
RUN_OP = ("import torch\nfrom rdr_fast import torch_impl\n"
          "x, y, w = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 0]), torch.rand(6, dtype=torch.float64)\n"
          "torch.testing.assert_close(torch.ops.rdr_fast.weighted_loss(x, y, w, None, 0.0, True),\n"
          "                           torch_impl.weighted_loss_torch(x, y, w, None, 0.0, True))\n")


def clean_env(**extra) -> dict:
    """This process's environment without rdr_fast's switches, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RDR_FAST_")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def run(args, cwd, env=None, timeout=600) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done


def report(done: subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout.strip().splitlines()[-1])


class Install:
    """A clean copy of the repository (src), its `pip wheel .` (wheel) and a virtual
    environment (python) that sees the installed torch and where `pip install .` ran."""

    def __init__(self, base: Path):
        self.base, self.cache = base, base / "cache"
        self.python = base / "venv" / "bin" / "python"

    def package_dir(self) -> Path:
        done = run([self.python, "-c", "import importlib.util as u; print(u.find_spec('rdr_fast').submodule_search_locations[0])"],
                   cwd=self.base)
        return Path(done.stdout.strip())

    def check(self, code: str, **env) -> subprocess.CompletedProcess:
        """Run `code` in the venv, warnings as errors, outside the source tree."""
        return run([self.python, "-W", "error", "-c", code], cwd=self.base,
                   env=clean_env(RDR_FAST_CACHE=str(self.cache), **env))


def copy_repository(dst: Path) -> None:
    """The checkout's files as git sees them (tracked and new, no ignored build output)."""
    listed = run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT).stdout.split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dst / name)


@pytest.fixture(scope="module")
def install(tmp_path_factory) -> Install:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout of the repository")
    inst = Install(tmp_path_factory.mktemp("install"))
    # --without-pip: the venv runs the system's pip (it sees the system site-packages,
    # so the dependencies are already there), which installs into the venv.
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", inst.base / "venv"], cwd=inst.base)
    for copy in ("wheel-src", "install-src"):  # each command from a clean copy of its own
        copy_repository(inst.base / copy)
    run([inst.python, "-m", "pip", "-q", "wheel", "--no-deps", "-w", inst.base / "dist", "."], cwd=inst.base / "wheel-src")
    run([inst.python, "-m", "pip", "install", "."], cwd=inst.base / "install-src")  # exactly the user's command
    return inst


@pytest.mark.slow
def test_pip_wheel_is_a_platform_wheel_carrying_the_compiled_module_and_its_sources(install):
    (wheel,) = (install.base / "dist").glob("rdr_fast-*.whl")
    assert not wheel.name.endswith("-none-any.whl"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert [n for n in names if n.startswith("rdr_fast/_C") and n.endswith(".so")], names
    assert {"rdr_fast/_C.torch_build", "rdr_fast/csrc/module.cpp", "rdr_fast/csrc/checks.h", "rdr_fast/kernels/__init__.py"} <= set(names)


@pytest.mark.slow
def test_pip_install_runs_the_cpp_kernels_without_a_warning(install):
    got = report(install.check(RUN_OP + REPORT))
    assert {devices["cpu"] for devices in got["backends"].values()} == {"cpp"}
    assert got["info"]["origin"] == "install"
    assert install.base / "venv" in install.package_dir().parents  # not an editable install outside
    assert Path(got["info"]["path"]).parent == install.package_dir()
    assert "C++ kernels: built at install" in install.check(INFO).stdout
    import torch

    assert (install.package_dir() / "_C.torch_build").read_text().split()[0] == torch.__version__


INFO = "import runpy; runpy.run_module('rdr_fast.info', run_name='__main__')"


@contextlib.contextmanager
def module_moved_aside(install: Install):
    """The venv's rdr_fast._C moved away, as when it was never built."""
    (module,) = install.package_dir().glob("_C*.so")
    aside = install.base / module.name
    module.rename(aside)
    try:
        yield install
    finally:
        aside.rename(module)


@pytest.fixture
def without_installed_module(install):
    with module_moved_aside(install):
        yield install


@pytest.mark.slow
def test_missing_module_is_compiled_once_into_the_cache_and_reused(without_installed_module):
    inst = without_installed_module
    # Importing compiles nothing: the first CPU use of an op does.
    imported = inst.check(REPORT)
    assert "rdr_fast: compiling" not in imported.stderr and not inst.cache.exists()
    assert report(imported)["info"]["origin"] == "pending"
    assert {devices["cpu"] for devices in report(imported)["backends"].values()} == {"pending"}
    # Two processes at once, as under torchrun: one compiles, the other waits for it.
    procs = [subprocess.Popen([inst.python, "-W", "error", "-c", RUN_OP + REPORT], cwd=inst.base, text=True,
                              env=clean_env(RDR_FAST_CACHE=str(inst.cache)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outputs
    assert sum("rdr_fast: compiling" in err for _, err in outputs) == 1, outputs
    for out, _ in outputs:
        got = json.loads(out.strip().splitlines()[-1])
        assert {devices["cpu"] for devices in got["backends"].values()} == {"cpp"}
        assert got["info"]["origin"] == "jit" and "not built at install" in got["info"]["reason"]
        library = Path(got["info"]["path"])
        assert library.parent.parent == inst.cache
    built_at = library.stat().st_mtime_ns

    later = inst.check(RUN_OP + REPORT)
    assert "rdr_fast: compiling" not in later.stderr and library.stat().st_mtime_ns == built_at
    assert report(later)["info"] == got["info"]
    assert "C++ kernels: compiled on this machine (cache)" in inst.check(INFO).stdout


@pytest.mark.slow
def test_a_module_built_for_another_torch_is_not_loaded(install):
    stamp = install.package_dir() / "_C.torch_build"
    kept = stamp.read_text()
    stamp.write_text("2.4.0 0000000")
    try:
        got = report(install.check(REPORT))
    finally:
        stamp.write_text(kept)
    assert got["info"]["origin"] in ("pending", "jit"), got["info"]  # "jit" once the cache holds a build
    assert "was built for torch 2.4.0 0000000" in got["info"]["reason"]


@pytest.mark.slow
@pytest.mark.parametrize("switch,module_present,origin", [
    ("RDR_FAST_JIT", True, "install"),  # only compiling is off: the installed module still loads
    ("RDR_FAST_JIT", False, "none"),
    ("RDR_FAST_BUILD_CPP", True, "none"),  # no C++ at all, even with the module there
    ("RDR_FAST_BUILD_CPP", False, "none"),
])
def test_switched_off_cpp_runs_the_torch_path_with_the_reason(install, switch, module_present, origin):
    code = "import warnings\nwarnings.simplefilter('always')\n" + RUN_OP + REPORT
    with contextlib.nullcontext() if module_present else module_moved_aside(install):
        done = run([install.python, "-c", code], cwd=install.base,
                   env=clean_env(RDR_FAST_CACHE=str(install.base / "unused"), **{switch: "0"}))
    got = report(done)
    assert got["info"]["origin"] == origin
    assert not (install.base / "unused").exists()
    if origin == "none":
        assert {devices["cpu"] for devices in got["backends"].values()} == {"torch"}
        assert f"{switch}=0" in got["info"]["reason"]
        assert f"{switch}=0" in done.stderr  # the one warning carries the reason


# Without a build: the source tree's rdr_fast, its _C blocked so that the JIT path runs.
BLOCKED = "import sys\nsys.modules['rdr_fast._C'] = None\n"


@pytest.mark.parametrize("compiler,reason", [
    ("/nonexistent/c++", "no C++ compiler: '/nonexistent/c++' is not on PATH"),
    ("false", "the build failed, its log is"),  # a "compiler" that fails at once
])
def test_impossible_jit_build_falls_back_to_the_torch_path_with_the_reason(tmp_path, compiler, reason):
    env = clean_env(RDR_FAST_CACHE=str(tmp_path), CXX=compiler)
    got = report(run([sys.executable, "-c", BLOCKED + RUN_OP + REPORT], cwd=ROOT, env=env))
    assert {devices["cpu"] for devices in got["backends"].values()} == {"torch"}
    assert got["info"]["origin"] == "none" and reason in got["info"]["reason"], got["info"]


def test_a_failed_jit_build_is_not_retried_until_its_log_is_deleted(tmp_path):
    env = clean_env(RDR_FAST_CACHE=str(tmp_path), CXX="false")
    run([sys.executable, "-c", BLOCKED + RUN_OP + REPORT], cwd=ROOT, env=env)
    again = run([sys.executable, "-c", BLOCKED + RUN_OP + REPORT], cwd=ROOT, env=env)
    assert "rdr_fast: compiling" not in again.stderr
    assert "an earlier compile of these sources failed" in report(again)["info"]["reason"]


def test_info_prints_torch_the_backends_and_where_the_kernels_came_from():
    import torch

    done = run([sys.executable, "-m", "rdr_fast.info"], cwd=ROOT)
    lines = done.stdout.splitlines()
    assert f"torch {torch.__version__}" in lines[0]
    assert any(line.startswith("weighted_loss: cpu=") for line in lines)
    assert any(line.startswith("C++ kernels: ") for line in lines)


def test_build_backend_asks_for_the_same_torch_range_as_the_project():
    tomllib = pytest.importorskip("tomllib")
    import ast

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    backend = ast.parse((ROOT / "build_backend.py").read_text())
    (requirement,) = [node.value.value for node in backend.body if isinstance(node, ast.Assign)
                      and getattr(node.targets[0], "id", "") == "TORCH_REQUIREMENT"]
    assert requirement in project["project"]["dependencies"]
    assert project["build-system"]["build-backend"] == "build_backend"
