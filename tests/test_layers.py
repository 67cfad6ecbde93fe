"""The package's layers (README, Layout): every import points down, and no two modules import
each other, directly or through others. Parsed with `ast`, so imports inside functions count.

A module's layer is that of its first package component (`ddpm_landmarks.data.splits` ->
`data`); the entry scripts `pretrain`, `finetune`, `classify` are part of `training`.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ddpm_landmarks"

# Lowest first; a module may import its own layer and every layer before it.
LAYERS = ["errors", "utils", "config", "heatmaps", "data", "models", "methods", "evaluation",
          "inference", "training", "experiments", "studies", "cli"]
ENTRY_SCRIPTS = {"pretrain": "training", "finetune": "training", "classify": "training"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules imported anywhere in `path` (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from a.b import c`: c may be a module (a.b.c) or a name in a.b.
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name in modules:
                found.add(name)
    return found


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:                       # the package itself
        return LAYERS[0]
    first = parts[1]
    return ENTRY_SCRIPTS.get(first, first)


def graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {m: imports_of(p, modules) - {m} for m, p in modules.items()}


def test_every_module_is_in_a_layer():
    unknown = sorted(m for m in package_modules() if layer_of(m) not in LAYERS)
    assert not unknown, f"modules outside the layers {LAYERS}: {unknown}"


def test_imports_point_down():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = []
    for module, imported in graph().items():
        for other in imported:
            # A package's __init__ importing its own submodules is within the layer.
            if rank[layer_of(other)] > rank[layer_of(module)]:
                upward.append(f"{module} ({layer_of(module)}) imports {other} "
                              f"({layer_of(other)})")
    assert not upward, "imports from a higher layer:\n" + "\n".join(sorted(upward))


def find_cycle(edges: dict[str, set[str]]) -> list[str]:
    """One import cycle as a path [a, b, ..., a], or [] (iterative DFS, three colours)."""
    colour = {m: 0 for m in edges}
    for start in sorted(edges):
        if colour[start]:
            continue
        stack = [(start, iter(sorted(edges[start])))]
        path = [start]
        colour[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(child) == 1:
                return path[path.index(child):] + [child]
            elif colour.get(child) == 0:
                colour[child] = 1
                stack.append((child, iter(sorted(edges[child]))))
                path.append(child)
    return []


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_loading_a_config_imports_neither_torch_nor_diffusers():
    """Configs are plain data: loading (and checking) one must not pull in the heavy stack."""
    code = ("import sys\n"
            "from ddpm_landmarks.config.schema import load_config\n"
            "from ddpm_landmarks.config.pretrain import PretrainConfig\n"
            "from ddpm_landmarks.config.finetune import FinetuneConfig\n"
            "from ddpm_landmarks.config.classify import ClassifyConfig\n"
            "from ddpm_landmarks.experiments.grid_schema import load_grid\n"
            f"load_config({str(ROOT / 'configs/pretrain/synthetic.yaml')!r}, cls=PretrainConfig)\n"
            f"load_config({str(ROOT / 'configs/finetune/isbi2015.yaml')!r}, cls=FinetuneConfig)\n"
            f"load_config({str(ROOT / 'configs/classify/synthetic.yaml')!r}, cls=ClassifyConfig)\n"
            f"load_grid({str(ROOT / 'experiments/cpu-small.yaml')!r})\n"
            "heavy = sorted(m for m in ('torch', 'diffusers', 'accelerate', 'cv2',\n"
            "               'segmentation_models_pytorch') if m in sys.modules)\n"
            "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"loading configs imported {out.stdout.strip()}"


@pytest.mark.parametrize("layer", LAYERS[1:])
def test_each_layer_folder_states_what_it_holds(layer):
    """Every stage folder opens with a docstring saying what it holds (README's Layout)."""
    init = PACKAGE / layer / "__init__.py"
    assert init.is_file(), f"{layer}/ has no __init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text()))
    assert doc and len(doc.split()) >= 5, f"{layer}/__init__.py has no docstring"
