"""Imports run one way: a module imports only from its own layer or the layers above it, with no
cycle, and imports inside functions only where the docstring of ``layers`` allows them.

The layers, top (imported by everything) to bottom, are ``nb_edit.LAYERS``; docs/architecture.md
draws the same map.
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import pytest

from nb_edit import LAYERS
from nb_edit.core import paths

SRC = paths.repo_root() / "src"


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, src: Path) -> list[tuple[str, int, bool]]:
    """(imported nb_edit module, line, at module level) for every import in a file."""
    name = module_name(path, src)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target]
            # `from nb_edit.core import paths` imports the module nb_edit.core.paths
            modules = {module_name(p, src) for p in (src / Path(*target.split("."))).glob("*.py")}
            targets += [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            if target == "nb_edit" or target.startswith("nb_edit."):
                found.append((target, node.lineno, id(node) in top_level))
    return found


def layer_of(module: str) -> int:
    """Index of a module's layer in LAYERS (``nb_edit`` itself, the version, is layer -1)."""
    rest = module.split(".")[1:]
    if not rest:
        return -1
    if rest[0] not in LAYERS:
        raise AssertionError(f"{module}: its folder {rest[0]!r} is no layer of nb_edit.LAYERS; add it there")
    return LAYERS.index(rest[0])


def check_tree(src: Path) -> list[str]:
    """Every upward import, cycle and unexplained function-level import under ``src/nb_edit``."""
    problems, graph = [], {}
    for path in sorted((src / "nb_edit").rglob("*.py")):
        name = module_name(path, src)
        lines = path.read_text().splitlines()
        graph.setdefault(name, set())
        for target, lineno, top in _imports(path, src):
            if layer_of(target) > layer_of(name):
                problems.append(f"{name}:{lineno} imports {target} from a lower layer")
            if not top and "# lazy:" not in lines[lineno - 1]:
                problems.append(f"{name}:{lineno} imports {target} inside a function without a '# lazy:' reason")
            if target != name and not name.startswith(target + "."):
                graph[name].add(target)
    problems += [f"import cycle: {' -> '.join(c)}" for c in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    seen, on_stack, cycles = set(), [], []

    def visit(node):
        if node in on_stack:
            cycles.append(on_stack[on_stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        on_stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            # a package import (`nb_edit.world`) resolves through its __init__
            visit(nxt)
        on_stack.pop()

    for node in sorted(graph):
        visit(node)
    return cycles


def test_layers_run_one_way_without_cycles():
    assert check_tree(SRC) == []


def _throwaway(tmp_path: Path, files: dict[str, str]) -> Path:
    src = tmp_path / "src"
    for rel, text in files.items():
        target = src / "nb_edit" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(textwrap.dedent(text))
    for folder in {p.parent for p in (src / "nb_edit").rglob("*.py")}:
        (folder / "__init__.py").touch()
    return src


def test_the_check_fails_on_an_upward_import(tmp_path):
    src = _throwaway(tmp_path, {"core/a.py": "from nb_edit.methods.b import x\n", "methods/b.py": "x = 1\n"})
    assert check_tree(src) == ["nb_edit.core.a:1 imports nb_edit.methods.b from a lower layer"]


def test_the_check_fails_on_a_cycle_and_an_unexplained_inner_import(tmp_path):
    src = _throwaway(tmp_path, {
        "flow/a.py": "from nb_edit.flow import b\n",
        "flow/b.py": "def f():\n    from nb_edit.flow import a\n",
    })
    problems = check_tree(src)
    assert "nb_edit.flow.b:2 imports nb_edit.flow.a inside a function without a '# lazy:' reason" in problems
    assert any(p.startswith("import cycle: nb_edit.flow.a -> nb_edit.flow.b -> nb_edit.flow.a") for p in problems)


def test_the_check_accepts_a_downward_import_and_an_explained_lazy_one(tmp_path):
    src = _throwaway(tmp_path, {
        "core/a.py": "x = 1\n",
        "methods/b.py": "from nb_edit.core import a\n\ndef f():\n    import nb_edit.flow.c  # lazy: heavy\n",
        "flow/c.py": "",
    })
    assert check_tree(src) == []


@pytest.mark.parametrize("layer", LAYERS)
def test_every_layer_is_a_folder_or_module(layer):
    assert (SRC / "nb_edit" / layer).is_dir() or (SRC / "nb_edit" / f"{layer}.py").is_file()


def test_the_architecture_map_matches_the_tree():
    """docs/architecture.md names every folder and top-level module of the package, and every
    entry of its map exists: the map a newcomer reads is the tree they will open."""
    block = (paths.repo_root() / "docs" / "architecture.md").read_text().split("```")[1]
    package = SRC / "nb_edit"
    folders = [p for p in package.rglob("__init__.py") if p.parent != package]
    expected = {p.parent.name + "/" for p in folders} | {p.name for p in package.glob("*.py") if not p.name.startswith("__")}
    missing = sorted(name for name in expected if not re.search(rf"(^|\s){re.escape(name)}", block, re.M))
    assert not missing, f"in the tree but not in docs/architecture.md: {missing}"
    listed = {line.split()[0] for line in block.splitlines()[1:] if line.strip()}
    listed = {name for name in listed if name.endswith(("/", ".py")) and name != "src/nb_edit/"}
    assert listed <= expected, f"in docs/architecture.md but not in the tree: {sorted(listed - expected)}"
