"""The layout the README's Files table documents: the reference on top (the architecture, the few files plain
generation needs, the commands), each feature in a folder of llama_fast/ that imports the core and is never imported
by it; every module imports only modules listed above it (no cycle); files and functions stay short."""
import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ("model_config", "model", "tokenizer", "sampling", "decoding", "tp")  # what plain generation needs
ENTRY_POINTS = ("generate", "quantize", "eval", "serve")
MAX_TOP_LEVEL_FILES = 12
MAX_FILE_LINES, MAX_FUNCTION_LINES = 450, 60
MAX_MODEL_LINES, MAX_LINE_CHARS = 400, 120


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def our_modules() -> list:
    """Every module of ours but the tests and scripts: the top level and llama_fast/ (not its empty __init__s)."""
    paths = [*ROOT.glob("*.py"), *ROOT.glob("llama_fast/**/*.py")]
    return sorted(module_name(p) for p in paths if p.name != "__init__.py")


def source(module: str) -> str:
    return (ROOT / (module.replace(".", "/") + ".py")).read_text()


def documented_order() -> list:
    """Modules in the order of the README's Files table (bottom of the import graph first)."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Files"):]
    table = table[:table.index("Scripts on top of these")]
    return [m.group(1).replace("/", ".") for m in re.finditer(r"^\| `([\w/]+)\.py` \|", table, re.M)]


def imports(module: str) -> set:
    """The dotted names a module imports (a `from package import module` counts as package.module)."""
    found = set()
    for node in ast.walk(ast.parse(source(module))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def our_imports(module: str) -> set:
    return imports(module) & set(our_modules())


def test_the_top_level_is_the_reference():
    top = sorted(p.stem for p in ROOT.glob("*.py"))
    assert top == sorted(CORE + ENTRY_POINTS), "a feature goes into a folder of llama_fast/, not the top level"
    assert len(top) <= MAX_TOP_LEVEL_FILES


def test_model_is_the_architecture_only():
    """model.py imports torch, the standard library and the config, nothing else of ours; short, unpacked lines."""
    text = source("model")
    roots = {name.split(".")[0] for name in imports("model")}
    assert roots - set(sys.stdlib_module_names) <= {"torch", "model_config"}
    assert text.count("\n") <= MAX_MODEL_LINES
    assert max(map(len, text.splitlines())) <= MAX_LINE_CHARS


def test_the_core_never_imports_a_feature():
    for module in CORE:
        assert not {name for name in imports(module) if name.split(".")[0] == "llama_fast"}, module


def test_every_module_is_documented_in_import_order():
    order = documented_order()
    assert sorted(order) == our_modules(), "the README's Files table must list every module once"
    for i, name in enumerate(order):
        above = our_imports(name) - set(order[:i])
        assert not above, f"{name} imports {sorted(above)}, which the README lists after it"
    assert order[-len(ENTRY_POINTS):] == list(ENTRY_POINTS), "entry points sit on top"


def test_entry_points_are_imported_by_nothing():
    scripts = [module_name(p) for p in ROOT.glob("scripts/*.py")]
    for module in [*our_modules(), *scripts]:
        if module not in ENTRY_POINTS:
            assert not imports(module) & set(ENTRY_POINTS), f"{module} imports an entry point"


def test_quantize_does_not_import_itself_as_a_second_module():
    """Run as a script, quantize.py is __main__; an import of `quantize` would load a second copy of the file."""
    proc = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "quantize.py"), "--help"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "llama_fast.quant.qlinear" in imported and "llama_fast.checkpoint" in imported  # it sees our modules
    assert not imported & set(ENTRY_POINTS)


def test_files_and_functions_are_short():
    """No module over 450 lines; no function over 60 lines except argparse builders."""
    paths = [ROOT / (m.replace(".", "/") + ".py") for m in our_modules()] + list(ROOT.glob("scripts/*.py"))
    for path in paths:
        text = path.read_text()
        assert path.parent.name == "scripts" or text.count("\n") <= MAX_FILE_LINES, f"{path.name}: too long"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "build_parser":
                length = node.end_lineno - node.lineno + 1
                assert length <= MAX_FUNCTION_LINES, f"{path.name}:{node.lineno} {node.name}: {length} lines"


def test_no_test_file_imports_another():
    """Tests share fixtures through conftest.py and helpers through helpers.py, never through each other."""
    test_files = {p.stem for p in ROOT.glob("tests/test_*.py")}
    for path in ROOT.glob("tests/*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
        assert not found & test_files, f"{path.name} imports {sorted(found & test_files)}"
