"""The house's shape, checked on every run so it stays true (docs/ARCHITECTURE.md): imports go one
way (nodes → hosts → trainers), functions stay short enough to read at once, and no shipped
docstring sends a reader to a file outside the repository."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["trainers", "hosts", "nodes", "world", "webui", "scripts", "install.py", "cli.py", "demo.py", "__init__.py"]
MAX_LINES = 60
#: node schemas are long lists of inputs with tooltips; the world's training scripts are recipes
LONG_ALLOWED = {"define_schema"}


def _files(*roots: str) -> list[Path]:
    out = []
    for r in roots:
        p = REPO / r
        out += [p] if p.is_file() else sorted(p.rglob("*.py"))
    return out


def _imports(path: Path) -> set[str]:
    """Absolute names of what ``path`` imports, relative imports resolved against the package."""
    pkg = ["likeness", *path.relative_to(REPO).parent.parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = pkg[:len(pkg) - node.level + 1] if node.level else []
            names.add(".".join(base + ([node.module] if node.module else [])))
    return names


@pytest.mark.parametrize("layer, forbidden", [
    ("trainers", ("likeness.hosts", "likeness.nodes", "comfy", "comfy_api", "folder_paths", "diffusers")),
    ("hosts", ("likeness.nodes", "likeness.webui")),
])
def test_imports_go_one_way(layer, forbidden):
    bad = [f"{p.relative_to(REPO)}: {name}" for p in _files(layer) for name in _imports(p)
           if name.startswith(forbidden)]
    assert not bad, bad


def test_functions_are_short_enough_to_read_at_once():
    long = []
    for path in _files(*SHIPPED, "bench", "tests"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in LONG_ALLOWED:
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_no_shipped_docstring_points_outside_the_repository():
    outside = []
    for path in _files(*SHIPPED):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node) or ""
                if "shared/" in doc or "../" in doc:
                    outside.append(f"{path.relative_to(REPO)}: {getattr(node, 'name', '<module>')}")
    assert not outside, outside
