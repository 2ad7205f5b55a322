"""The shape of the package, checked so it cannot drift: the import layers, module and
function sizes, and the layout that docs/development.md describes."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "moekit"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
# A longer function carries this comment saying why it cannot be split.
LONG_MARKER = re.compile(r"#\s*long function:\s*\S")


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_import_layers_and_no_cycles():
    # The contracts in pyproject.toml: a module imports only from its own layer or below, and
    # the modules of a package do not import each other in a circle.
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
         "sys.exit(lint_imports(no_cache=True, no_logo=True))"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_stay_small(path):
    text = path.read_text()
    lines = text.splitlines()
    assert len(lines) <= MAX_MODULE_LINES, f"{len(lines)} lines: one concept per module"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            assert node.end_lineno is not None
            body = lines[node.lineno - 1 : node.end_lineno]
            if len(body) > MAX_FUNCTION_LINES:
                assert any(LONG_MARKER.search(line) for line in body), (
                    f"{node.name} is {len(body)} lines: split it, or say why it cannot be "
                    "with a '# long function: ...' comment"
                )


def documented_layout() -> tuple[set[str], set[str]]:
    """The modules (top-level files and package/file paths) and the folders that the layout
    block of docs/development.md names."""
    doc = (ROOT / "docs" / "development.md").read_text()
    block = doc.split("<!-- layout -->")[1]
    modules: set[str] = set()
    folders: set[str] = set()
    package = ""
    for line in block.splitlines():
        entry = re.match(r"^  (\S+)\s", line + " ")
        if entry:  # a top-level file or folder
            name = entry.group(1)
            package = name if name.endswith("/") else ""
            if package:
                folders.add(name)
            elif name.endswith(".py"):
                modules.add(name)
        if package and line.startswith("  "):
            text = line.split(None, 1)[1] if entry else line
            modules.update(package + n for n in re.findall(r"[\w./]+\.py\b", text))
    return modules - {"__init__.py"}, folders


def actual_layout() -> tuple[set[str], set[str]]:
    modules = {
        str(p.relative_to(PACKAGE)).replace("\\", "/")
        for p in PACKAGE.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    }
    folders = {p.name + "/" for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    return modules, folders


def test_docs_show_the_real_layout():
    (documented, folders), (actual, actual_folders) = documented_layout(), actual_layout()
    assert not actual - documented, (
        f"docs/development.md does not list {sorted(actual - documented)}"
    )
    assert not documented - actual, f"docs/development.md lists {sorted(documented - actual)}"
    assert folders == actual_folders
