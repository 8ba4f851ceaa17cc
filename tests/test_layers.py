"""The package's shape, read from its source: llama.cpp behind one door, and no import cycles,
lazy imports inside functions included (they once hid two)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "infmllm_gguf"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it (absolute names)."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import native`
    return out


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_only_the_runtime_calls_llama_cpp():
    callers = {module_name(p) for p in PACKAGE.rglob("*.py") if any(m.split(".")[0] == "llama_cpp" for m in imports(p))}
    assert callers and all(name.startswith("infmllm_gguf.runtime") for name in callers), sorted(callers)


def test_no_import_cycles():
    edges = graph()
    # a package imports its own modules in __init__: follow modules, not the package's re-exports
    for name in list(edges):
        edges[name] = {m for m in edges[name] if not name.startswith(m + ".")}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert "infmllm_gguf.session" in edges and "infmllm_gguf.controller" in edges["infmllm_gguf.session"]


def test_each_layer_imports_only_those_below_it():
    """The import-linter contract in pyproject.toml (the layers of docs/ARCHITECTURE.md), lazy
    imports inside functions included."""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert result.returncode == 0 and "1 kept, 0 broken" in result.stdout, result.stdout + result.stderr


def test_the_installed_packages_are_every_package_here():
    """pyproject.toml lists the packages (the repository's cli/ installs as infmllm_gguf.cli): a new
    one left out would be missing from an installed copy."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    here = {module_name(p.parent / "__init__.py") for p in PACKAGE.rglob("*.py")} | {"infmllm_gguf.cli"}
    here |= {module_name(p / "x.py").rsplit(".", 1)[0] for p in PACKAGE.rglob("static")}  # data-only folders
    assert listed == here


def test_ggml_libraries_are_opened_at_first_use_not_at_import():
    code = """
import ctypes
import llama_cpp
opened, real = [], ctypes.CDLL
class Spy(real):
    def __init__(self, name, *args, **kwargs):
        opened.append(str(name))
        super().__init__(name, *args, **kwargs)
ctypes.CDLL = Spy
import infmllm_gguf.runtime
print(sum('ggml' in o for o in opened))
infmllm_gguf.runtime.ggml.rpc_available()
print(sum('ggml' in o for o in opened))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "1"], out


def reached_assignments(path: Path) -> list[str]:
    """Assignments to an attribute of an object reached through another (``a.b.c = v``): the way
    a higher layer used to wire itself into a lower one (``session.cache.memory = memory``, which
    the controller then called). An object's own private parts (``self._stats.n``) and NumPy's
    generator state are its own business."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            for t in target.elts if isinstance(target, ast.Tuple) else [target]:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Attribute) \
                        and not t.value.attr.startswith("_") and t.value.attr != "bit_generator" \
                        and ast.unparse(t.value) != "self.stats":
                    out.append(f"{path.relative_to(PACKAGE.parent)}:{t.lineno} {ast.unparse(t)}")
    return out


def test_no_layer_wires_itself_into_another_through_its_attributes():
    """Each part is wired where it is made (constructor arguments: the controller's `listeners` too);
    nothing sets an attribute on a part of another object afterwards."""
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in reached_assignments(path)]
    found += [hit for path in sorted((PACKAGE.parent / "cli").glob("*.py")) for hit in reached_assignments(path)]
    assert not found, found


def test_classes_stay_small():
    """No class over 250 lines: a class that grows past it gets its parts split out."""
    long = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
            for path in sorted(PACKAGE.rglob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 250]
    assert not long, long
