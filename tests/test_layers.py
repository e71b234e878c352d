"""The layer map in the README is the code's: no import goes up the map, every module is placed, no import cycle.

The map is read from the README's architecture block (``gmpq/<path>  <layer>  <description>``); imports are read
from every module's abstract syntax tree (nothing is imported), wherever they are written: at the top, inside
functions, under ``TYPE_CHECKING``. There is no list of exceptions.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "gmpq"
MAP_LINE = re.compile(r"^(gmpq/\S*)\s+(\d+)\s")


def layer_map() -> dict[str, int]:
    """``{"gmpq.quant": 1, "gmpq.policy": 2, ...}`` from the README's architecture block."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Architecture"):]
    block = section[section.index("```") + 3:]
    block = block[: block.index("```")]
    layers = {}
    for line in block.splitlines():
        match = MAP_LINE.match(line)
        if match:
            path = match.group(1).rstrip("/").removesuffix(".py").removesuffix("/__init__")
            layers[path.replace("/", ".")] = int(match.group(2))
    return layers


def module_names() -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package is named by its ``__init__.py``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The gmpq modules ``name`` imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m == "gmpq" or m.startswith("gmpq.")}


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    """The layer of the longest map entry that ``module`` is, or lies in."""
    best = None
    for prefix, layer in layers.items():
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return None if best is None else best[1]


def graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, modules) - {name} for name, path in modules.items()}


def test_the_readme_places_every_module() -> None:
    layers = layer_map()
    assert layers, "no layer map found in the README's architecture section"
    # the root package's own entry (gmpq/__init__.py) places the root alone, not everything under it
    entries = {prefix: layer for prefix, layer in layers.items() if prefix != "gmpq"}
    unplaced = [m for m in module_names() if m != "gmpq" and layer_of(m, entries) is None]
    assert not unplaced, f"modules missing from the README's layer map: {unplaced}"
    stale = [prefix for prefix in layers if not any(m == prefix or m.startswith(prefix + ".") for m in module_names())]
    assert not stale, f"the README's layer map names modules that do not exist: {stale}"


def test_no_import_goes_up_the_map() -> None:
    layers = layer_map()
    upward = []
    for module, targets in graph().items():
        own = layer_of(module, layers)
        for target in targets:
            # importing gmpq.a.b also runs the package gmpq.a (the root package, the API's face, is exempt: it is
            # what makes `import gmpq.x` possible at all)
            for parent in [target, *(target.rsplit(".", k)[0] for k in range(1, target.count(".")))]:
                layer = layer_of(parent, layers)
                if parent != "gmpq" and layer is not None and layer > own:
                    upward.append(f"{module} (layer {own}) imports {parent} (layer {layer})")
    assert not upward, "imports going up the README's layer map:\n" + "\n".join(sorted(set(upward)))


def test_no_import_cycle() -> None:
    """Tarjan's strongly connected components of the explicit import graph: each must be one module."""
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_upward_edges_anywhere(tmp_path: Path) -> None:
    """The walker finds imports inside functions and under TYPE_CHECKING, and resolves `from pkg import sub`."""
    code = ("from typing import TYPE_CHECKING\nfrom gmpq.hub import format as F\nif TYPE_CHECKING:\n"
            "    from gmpq.stages import search\ndef f():\n    import gmpq.pipeline\n")
    path = tmp_path / "probe.py"
    path.write_text(code)
    found = imports_of("gmpq.quant.probe", path, module_names())
    assert found == {"gmpq.hub.format", "gmpq.stages", "gmpq.pipeline"}
    layers = layer_map()
    assert all(layer_of(m, layers) > layer_of("gmpq.quant.probe", layers) for m in found)
