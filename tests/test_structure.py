"""The package's shape: every module imports on its own, the import graph has no cycle,
and the repository explains itself (no pointer to documents that are not in it)."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rdr_fast"
# rdr_fast.kernels is the top-level kernels/ folder, installed under the package.
SOURCE_DIRS = {"rdr_fast": PACKAGE, "rdr_fast.kernels": ROOT / "kernels"}


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the installed package."""
    modules = {}
    for prefix, folder in SOURCE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if "kernels" in parts and prefix == "rdr_fast":  # a link to kernels/ inside a checkout
                continue
            modules[".".join([prefix, *parts])] = path
    return modules


MODULES = module_files()


def imported_modules(name: str, path: Path) -> set[str]:
    """The package modules that ``name`` imports anywhere in its source (module level or
    inside functions: a lazy import that runs at import time closes a cycle all the same).
    Only explicit imports are edges: the implicit import of a parent package is not."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule when one exists.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
    return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes, or None (depth-first, colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = {name: imported_modules(name, path) for name, path in MODULES.items()}
    assert graph["rdr_fast"], "the graph is empty: the import parser reads nothing"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


# Run in a fresh interpreter: torch (a dependency, not under test) is imported once, then
# each module is imported in a forked child in which no rdr_fast module is loaded yet.
IMPORT_EACH_ALONE = """
import importlib, os, sys, traceback
import torch  # noqa: F401
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
            os._exit(0)
        except BaseException:
            print(name, traceback.format_exc().strip().splitlines()[-1], flush=True)
            os._exit(1)
    os.waitpid(pid, 0)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", IMPORT_EACH_ALONE, *sorted(MODULES)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", proc.stdout


# What a reader cannot follow: a design document or style guide outside the repository,
# a folder next to the checkout, the tracker, or the machines the project was built on.
FORBIDDEN = [
    # The word in capitals: a variable named `spec` (importlib's) is not one.
    (re.compile(r"\bSPEC\b|(?i:SPEC\.md|SPEC\s*§)"), "a pointer to a design document"),
    (re.compile(r"STYLE\s*§|STYLE\.md", re.IGNORECASE), "a pointer to a style guide"),
    (re.compile(r"\.\./shared|\bshared/|/work/", re.IGNORECASE), "a path outside the repository"),
    # Letters, not \b, bound the word, so that identifiers (test_the_issues_x) count too;
    # the verb ("issues a warning", "issue no op") does not.
    (re.compile(r"(?<![a-z])issue(?:s|'s)?(?![a-z])(?!\s+(?:a|an|one|the|no)\b)", re.IGNORECASE),
     "a reference to the tracker"),
    (re.compile(r"\blent\b|\blends?\b|\bloan(?:ed)?\b|\bborrowed\b", re.IGNORECASE),
     "the machines it was built on"),
]
TEXT_SUFFIXES = {".py", ".md", ".cpp", ".h", ".cu", ".toml", ".cfg", ".txt", ".sh", ".in", ".yml", ".yaml",
                 ".json", ""}


def repository_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.fail(f"git ls-files failed: {listed.stderr}")
    return [ROOT / f for f in listed.stdout.splitlines()
            if Path(f).suffix in TEXT_SUFFIXES and (ROOT / f).is_file() and f != "tests/test_structure.py"]


def test_the_repository_explains_itself():
    hits = []
    for path in repository_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            hits += [f"{path.relative_to(ROOT)}:{number}: {why}: {line.strip()[:100]}"
                     for pattern, why in FORBIDDEN if pattern.search(line)]
    assert not hits, "\n".join(hits)
