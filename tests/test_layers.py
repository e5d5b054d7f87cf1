"""The package structure: imports point down the layers of pdserve/__init__.py, no
module cycles, a coordinator that reaches neither the engine nor torch, and a wheel
that installs nothing but the pdserve namespace."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# source folder -> installed package (pyproject's package-dir)
FOLDERS = {"pdserve": "pdserve", "engine": "pdserve.engine", "kv_transfer": "pdserve.kv_transfer",
           "coordinator": "pdserve.coordinator", "prefill_node": "pdserve.prefill_node",
           "decode_node": "pdserve.decode_node", "colocated_node": "pdserve.colocated_node"}
# lowest first; a module may import its own package and any package of a lower layer
LAYERS = [
    ["pdserve.v1", "pdserve.common"],
    ["pdserve.wire"],
    ["pdserve.engine"],
    ["pdserve.kv_transfer"],
    ["pdserve.node"],
    ["pdserve.prefill_node", "pdserve.decode_node", "pdserve.colocated_node", "pdserve.coordinator"],
    ["pdserve"],  # the CLI, launcher, client and benchmarks tooling directly under pdserve/
]
SIDEWAYS = {("pdserve.colocated_node", "pdserve.decode_node")}  # a colocated node reuses the decode node's streams
COORDINATOR_MAY_IMPORT = {"pdserve.coordinator", "pdserve.wire", "pdserve.common", "pdserve.v1", "pdserve"}


def package_of(module: str) -> str:
    for layer in LAYERS:
        for pkg in sorted(layer, key=len, reverse=True):
            if pkg != "pdserve" and (module == pkg or module.startswith(pkg + ".")):
                return pkg
    return "pdserve"


def layer_of(pkg: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if pkg in layer)


def modules() -> dict[str, Path]:
    out = {}
    for folder, pkg in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("").parts
            rel = rel[:-1] if rel[-1] == "__init__" else rel
            out[".".join((pkg, *rel))] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every pdserve module `name` imports, at any depth of the file (lazy and TYPE_CHECKING ones too)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_imports_point_down_the_layers(graph):
    wrong = []
    for src, targets in graph.items():
        sp = package_of(src)
        for dst in targets:
            dp = package_of(dst)
            if dp == sp or dst == "pdserve" or (sp, dp) in SIDEWAYS:
                continue
            if layer_of(dp) >= layer_of(sp):
                wrong.append(f"{src} -> {dst}")
    assert not wrong, "imports that do not point down:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles(graph):
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v); on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w); low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_coordinator_reaches_neither_the_engine_nor_torch(graph):
    reach, todo = set(), ["pdserve.coordinator.server"]
    while todo:
        m = todo.pop()
        if m not in reach:
            reach.add(m)
            todo.extend(graph[m])
    assert {package_of(m) for m in reach} <= COORDINATOR_MAY_IMPORT, sorted(reach)
    code = ("import sys; sys.modules['torch'] = None\n"
            "import pdserve.coordinator.server, pdserve.cli\n"
            # the CLI reads the KV backends' config dataclasses (torch-free) for their flags, nothing else of theirs
            "bad = [m for m in sys.modules if m.startswith(('pdserve.engine', 'pdserve.node')) or m.startswith("
            "'pdserve.kv_transfer.') and not m.endswith(('.config', '.registry', '.nccl', '.zmq', '.cuda_ipc', '.fake'))]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_wheel_installs_only_the_pdserve_namespace(tmp_path):
    src = tmp_path / "src"  # a copy: building in place would leave build/ in the checkout
    for name in FOLDERS:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(src)], check=True, cwd=tmp_path)
    wheel = next(tmp_path.glob("pdserve-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"pdserve"}, sorted(tops)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "pdserve = pdserve.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    packaged = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    expected = {m.replace(".", "/") for m, p in modules().items() if p.name == "__init__.py"}
    assert expected <= packaged, f"packages missing from the wheel: {sorted(expected - packaged)}"
