"""The import graph follows DESIGN.md's layer order: no module imports a module of a higher layer.

Every ``import`` of a ``wrpo_nemo`` module is read from the source (top-level and function-level alike), so a
lazy import inside a function counts as much as one at the top of a file.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "wrpo_nemo"

# Lowest first. A module belongs to the first prefix it starts with.
LAYERS = [
    ("errors", ("wrpo_nemo.errors",)),
    ("math", ("wrpo_nemo.logprobs", "wrpo_nemo.losses", "wrpo_nemo.alpha")),
    ("data", ("wrpo_nemo.data",)),
    ("model", ("wrpo_nemo.models", "wrpo_nemo.compat")),
    ("checkpoint format", ("wrpo_nemo.checkpoint",)),
    ("training", ("wrpo_nemo.training",)),
    ("converters", ("wrpo_nemo.converters",)),
    ("entry", ("wrpo_nemo.pipeline", "wrpo_nemo.integrations", "wrpo_nemo.cli")),
]


def layer_of(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # ``from wrpo_nemo.training import checkpoint`` imports the submodule.
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("wrpo_nemo.")}


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if module_name(p) != "wrpo_nemo")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_no_module_imports_a_higher_layer(path):
    own = layer_of(module_name(path))
    upward = []
    for target in sorted(imports(path)):
        try:
            target_layer = layer_of(target)
        except AssertionError:
            # ``from wrpo_nemo.training import checkpoint``: the package part decides.
            target_layer = layer_of(target.rsplit(".", 1)[0])
        if target_layer > own:
            upward.append(f"{target} ({LAYERS[target_layer][0]})")
    assert not upward, f"{module_name(path)} ({LAYERS[own][0]}) imports a higher layer: {upward}"


def test_every_layer_has_modules():
    assert {layer_of(module_name(p)) for p in SOURCES} == set(range(len(LAYERS)))
