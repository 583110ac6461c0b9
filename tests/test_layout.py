"""The folders show the architecture: each imports only the folders beneath it, never one above."""

import ast
from pathlib import Path

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"
# Bottom to top; a folder may import its own modules and those of any folder before it (and pipeline/limits.py).
LAYERS = ("models", "scorers", "scoring", "batch", "analysis", "training", "cli")


def _imports(path: Path) -> list[str]:
    modules = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.append(node.module)
        elif isinstance(node, ast.Import):
            modules.extend(alias.name for alias in node.names)
    return [m for m in modules if m.startswith("pipeline.")]


def test_every_folder_imports_only_downward():
    upward = []
    for path in sorted(PIPELINE.rglob("*.py")):
        parts = path.relative_to(PIPELINE).parts
        if len(parts) < 2:
            continue  # pipeline/__init__.py, pipeline/limits.py: leaves that import nothing of the pipeline
        rank = LAYERS.index(parts[0])
        for module in _imports(path):
            folder = module.split(".")[1]
            if folder in LAYERS and LAYERS.index(folder) > rank:
                upward.append(f"{path.relative_to(PIPELINE)} imports {module}")
    assert upward == []


def test_every_folder_says_what_it_holds():
    folders = sorted(p.parent.name for p in PIPELINE.glob("*/__init__.py"))
    assert folders == sorted(LAYERS)
    for folder in LAYERS:
        caption = ast.get_docstring(ast.parse((PIPELINE / folder / "__init__.py").read_text()))
        assert caption and caption.splitlines()[0].endswith("."), folder  # a one-line caption first
    assert [m for m in map(_imports, PIPELINE.glob("*.py")) if m] == []  # the top-level modules are leaves
