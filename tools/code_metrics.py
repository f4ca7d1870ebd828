"""The structure figures of issue 11, for any checkout: the longest host functions (with and
without their docstrings), raises per 1,000 lines, and how many places a few defaults and
taxonomies are written.

    python tools/code_metrics.py [REPO_ROOT]
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

# a default or a tuple that must be written once: (what, regex)
SINGLE_HOMES = (
    ("sapo_temperature_neg's default 1.05", r"1\.05"),
    ("the ignore index -100 as a definition", r"^\s*_?IGNORE(_INDEX)? = -100"),
    ("the impl tuple", r"\(\"auto\", \"(triton\", \"torch|torch\", \"triton)\"\)"),
)


def _is_triton_kernel(node: ast.FunctionDef) -> bool:
    return any("jit" in ast.unparse(d) for d in node.decorator_list)


def _docstring_lines(node: ast.FunctionDef) -> int:
    first = node.body[0] if node.body else None
    if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant):
        if isinstance(first.value.value, str):
            return first.end_lineno - first.lineno + 1
    return 0


def main(root: Path) -> None:
    files = sorted((root / "fastrl").rglob("*.py")) + sorted((root / "kernels").glob("*.py"))
    functions, raises, lines = [], 0, 0
    homes = {what: 0 for what, _ in SINGLE_HOMES}
    for path in files:
        source = path.read_text(encoding="utf-8")
        lines += source.count("\n")
        raises += len(re.findall(r"^\s*raise\b", source, re.M))
        for what, pattern in SINGLE_HOMES:
            homes[what] += len(re.findall(pattern, source, re.M))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and not _is_triton_kernel(node):
                n = node.end_lineno - node.lineno + 1
                name = f"{path.relative_to(root)}::{node.name}"
                functions.append((n, n - _docstring_lines(node), name))
    functions.sort(reverse=True)
    print(f"{lines} lines, {raises} raises: {1000 * raises / lines:.1f} per 1,000 lines")
    print("longest host functions (lines, without the docstring):")
    for n, code, name in functions[:8]:
        print(f"  {n:4d} ({code:3d})  {name}")
    print(f"host functions over 120 lines: {sum(1 for n, _, _ in functions if n > 120)}")
    for what, count in homes.items():
        print(f"places writing {what}: {count}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve())
