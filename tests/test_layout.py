"""The layout the README's Files table documents: each top-level module imports only modules listed above it
(so the import graph has no cycle), entry points are imported by nothing, and files and functions stay short."""
import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINTS = ("generate", "quantize", "eval", "serve")
MAX_FILE_LINES, MAX_FUNCTION_LINES = 450, 60


def documented_order() -> list:
    """Top-level modules in the order of the README's Files table (bottom of the import graph first)."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Files"):]
    table = table[:table.index("\n## ")]
    return [m.group(1) for m in re.finditer(r"^\| `(\w+)\.py` \|", table, re.M)]


def our_imports(path: Path, modules: set) -> set:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found & modules


def test_every_module_is_documented_in_import_order():
    order = documented_order()
    on_disk = sorted(p.stem for p in ROOT.glob("*.py"))
    assert sorted(order) == on_disk, "the README's Files table must list every top-level module once"
    modules = set(order)
    for i, name in enumerate(order):
        imported = our_imports(ROOT / f"{name}.py", modules)
        above = imported - set(order[:i])
        assert not above, f"{name}.py imports {sorted(above)}, which the README lists after it"
    assert order[-len(ENTRY_POINTS):] == list(ENTRY_POINTS), "entry points sit on top"


def test_entry_points_are_imported_by_nothing():
    modules = set(documented_order())
    for path in [*ROOT.glob("*.py"), *ROOT.glob("scripts/*.py")]:
        if path.stem not in ENTRY_POINTS:
            assert not our_imports(path, set(ENTRY_POINTS) & modules), f"{path.name} imports an entry point"


def test_quantize_does_not_import_itself_as_a_second_module():
    """Run as a script, quantize.py is __main__; an import of `quantize` would load a second copy of the file."""
    proc = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "quantize.py"), "--help"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "qlinear" in imported and "checkpoint" in imported  # the check sees our modules
    assert not imported & set(ENTRY_POINTS)


def test_files_and_functions_are_short():
    """No top-level file over 450 lines; no function over 60 lines except argparse builders."""
    for path in [*ROOT.glob("*.py"), *ROOT.glob("scripts/*.py")]:
        lines = path.read_text().count("\n")
        assert path.parent != ROOT or lines <= MAX_FILE_LINES, f"{path.name}: {lines} lines"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "build_parser":
                length = node.end_lineno - node.lineno + 1
                assert length <= MAX_FUNCTION_LINES, f"{path.name}:{node.lineno} {node.name}: {length} lines"
