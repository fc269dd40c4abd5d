"""The house's layout rules that a reader relies on: no module of src/ or bench/ reaches for another lorafit
module's private name (a leading underscore means "only this module uses it")."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "lorafit"


def lorafit_module_names(tree: ast.AST, path: Path) -> set[str]:
    """Local names bound to lorafit modules in this file (import lorafit.x as y, from lorafit import x)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] == "lorafit"}
        elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "lorafit"):
            names |= {a.asname or a.name for a in node.names if (PACKAGE / f"{a.name}.py").is_file()}
    return names


def private_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    modules = lorafit_module_names(tree, path)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "lorafit"):
            found += [f"{path.relative_to(ROOT)}:{node.lineno} imports {a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
              and node.attr.startswith("_") and not node.attr.startswith("__")):
            found += [f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}"]
    return found


def test_no_private_name_crosses_modules_in_src_and_bench():
    files = sorted([*PACKAGE.rglob("*.py"), *(ROOT / "bench").rglob("*.py")])
    assert len(files) > 20
    found = [use for path in files for use in private_uses(path)]
    assert not found, "\n".join(found)


def test_the_check_sees_a_private_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("from lorafit.train import _hidden\nimport lorafit.model as m\nm._secret()\n")
    global ROOT
    root, ROOT = ROOT, tmp_path
    try:
        assert [u.split(" ", 1)[1] for u in private_uses(sample)] == ["imports _hidden", "uses m._secret"]
    finally:
        ROOT = root
