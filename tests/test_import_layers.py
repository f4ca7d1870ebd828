"""The import graph is layered: kernels <- checks/options <- ops <- integrations/trainers
<- cli/demo/sample, and no import points back up (DESIGN.md's layout)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# module prefix -> layer; the longest matching prefix wins
LAYERS = {
    "fastrl.kernels": 0,
    "fastrl.checks": 1,
    "fastrl.options": 1,
    "fastrl": 2,  # the public API (re-exports of the ops)
    "fastrl.ops": 2,
    "fastrl.reference": 2,
    "fastrl.integrations": 3,
    "fastrl.trainers": 3,
    "fastrl.cli": 4,
    "fastrl.demo": 4,
    "fastrl.sample": 4,
}


def _layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["fastrl", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path):
    """(line, module) for every fastrl import in the file, function-level ones included."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from fastrl import x` names a submodule when x is one
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            names = [n for n in names if not (n != node.module and not _is_module(n))]
        else:
            continue
        for name in names:
            if name == "fastrl" or name.startswith("fastrl."):
                yield node.lineno, name


def _is_module(name: str) -> bool:
    parts = name.split(".")
    base = ROOT / "kernels" if parts[:2] == ["fastrl", "kernels"] else ROOT / "fastrl"
    rest = parts[2:] if parts[:2] == ["fastrl", "kernels"] else parts[1:]
    path = base.joinpath(*rest) if rest else base
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


SOURCES = sorted((ROOT / "fastrl").rglob("*.py")) + sorted((ROOT / "kernels").glob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_points_up(path):
    here = _module_name(path)
    wrong = [
        f"line {line}: {here} (layer {_layer(here)}) imports {name} (layer {_layer(name)})"
        for line, name in _imports(path)
        if _layer(name) > _layer(here)
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_kernels_import_only_kernels(path):
    here = _module_name(path)
    if not here.startswith("fastrl.kernels"):
        return
    names = [name for _, name in _imports(path) if not name.startswith("fastrl.kernels")]
    assert not names, names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_only_the_front_ends_import_the_trainers(path):
    here = _module_name(path)
    if _layer(here) == 4 or here.startswith("fastrl.trainers"):
        return
    names = [name for _, name in _imports(path) if name.startswith("fastrl.trainers")]
    assert not names, names


def test_the_check_sees_an_upward_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import torch\n\ndef f():\n    from fastrl.cli import main\n")
    found = [name for _, name in _imports(probe)]
    assert found == ["fastrl.cli"] and _layer("fastrl.cli") > _layer("fastrl.ops.policy.loss")
