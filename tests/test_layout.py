"""The house's layout rules that a reader relies on: no module of src/ or bench/ reaches for another lorafit
module's private name (a leading underscore means "only this module uses it"); bench/ scripts share their helpers
through bench/common.py, not by changing sys.path or by writing them again."""

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


def test_the_check_sees_a_private_import(tmp_path, monkeypatch):
    sample = tmp_path / "sample.py"
    sample.write_text("from lorafit.train import _hidden\nimport lorafit.model as m\nm._secret()\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)  # paths in the findings are relative to ROOT
    assert [u.split(" ", 1)[1] for u in private_uses(sample)] == ["imports _hidden", "uses m._secret"]


BENCH = ROOT / "bench"
# the one sys.path change bench/ keeps: bench/gpu.py runs lorafit from this checkout on a GPU machine without it
ALLOWED_PATH_CHANGES = {"gpu.py": ["sys.path.insert(0, str(REPO / 'src'))"]}


def sys_path_changes(path: Path) -> list[str]:
    """What in `path` changes sys.path: a call of a method that changes a list, or an assignment to it."""
    def is_sys_path(node) -> bool:
        if isinstance(node, ast.Subscript):
            node = node.value
        return (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                and node.value.id == "sys")

    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and is_sys_path(node.func.value)
                and node.func.attr in ("insert", "append", "extend", "remove", "pop", "clear")):
            found.append(ast.unparse(node))
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(is_sys_path(t) for t in targets):
                found.append(ast.unparse(node))
    return sorted(found)


def test_bench_scripts_leave_sys_path_alone():
    """A script run as `python bench/x.py` has bench/ on sys.path already: `from common import ...` and importing a
    neighbour script by its name need nothing more."""
    scripts = sorted(BENCH.glob("*.py"))
    assert len(scripts) > 10
    found = {p.name: sys_path_changes(p) for p in scripts if sys_path_changes(p)}
    assert found == ALLOWED_PATH_CHANGES


def test_the_sys_path_check_sees_every_change(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import sys\nsys.path.insert(0, 'x')\nsys.path.append('y')\nsys.path[:0] = ['z']\n"
                      "sys.path += ['w']\nprint(sys.path.index('x'))\n")
    assert sys_path_changes(sample) == ["sys.path += ['w']", "sys.path.append('y')", "sys.path.insert(0, 'x')",
                                        "sys.path[:0] = ['z']"]  # reading it (index) is no change


def cpuinfo_readers(path: Path) -> list[str]:
    """Functions of `path` that open /proc/cpuinfo (a call with that path among its arguments)."""
    found = []
    for func in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            calls = [n for n in ast.walk(func) if isinstance(n, ast.Call)]
            if any(isinstance(a, ast.Constant) and a.value == "/proc/cpuinfo" for c in calls for a in c.args):
                found.append(f"{path.name}:{func.name}")
    return found


def test_the_cpu_is_named_in_bench_common_alone(tmp_path):
    assert (BENCH / "common.py").is_file()
    assert [r for p in sorted(BENCH.rglob("*.py")) for r in cpuinfo_readers(p)] == ["common.py:cpu_name"]
    sample = tmp_path / "sample.py"
    sample.write_text("from pathlib import Path\n\ndef name():\n    return Path('/proc/cpuinfo').read_text()\n\n"
                      "def other():\n    with open('/proc/cpuinfo') as f:\n        return f.read()\n")
    assert cpuinfo_readers(sample) == ["sample.py:name", "sample.py:other"]


# --- the run directory has one owner: lorafit.rundir spells and reads its files --------------------------------
RUN_FILE_NAMES = ("test_metrics.json", "run.json", "labels.json", "data.json", "splits.json", "metrics.jsonl",
                  "config.yaml")


def run_file_literals(path: Path) -> list[str]:
    """String literals of `path` that name a run file: the name itself, or a path ending in it ('x/run.json').
    Docstrings and prose that mention a file among other words are not names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            value = node.value.strip()
            if any(value == name or value.endswith("/" + name) for name in RUN_FILE_NAMES):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} spells {value!r}")
    return found


def test_only_rundir_spells_a_run_file_name():
    from lorafit import rundir

    files = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "rundir.py")
    assert len(files) > 20
    found = [hit for path in files for hit in run_file_literals(path)]
    assert not found, "use lorafit.rundir's functions and constants:\n" + "\n".join(found)
    constants = {rundir.RUN_FILE, rundir.CONFIG_FILE, rundir.LABELS_FILE, rundir.DATA_FILE, rundir.SPLITS_FILE,
                 rundir.METRICS_FILE, rundir.TEST_METRICS_FILE}
    assert constants == set(RUN_FILE_NAMES)  # the check looks for every name rundir owns


def test_the_run_file_check_sees_a_literal(tmp_path, monkeypatch):
    sample = tmp_path / "sample.py"
    sample.write_text('import json\n"""Reads run.json and labels.json."""\np = "test_metrics.json"\n'
                      'q = run / "splits.json"\nr = f"{run}/config.yaml"\n')
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert [u.split(" ", 1)[1] for u in run_file_literals(sample)] == [
        "spells 'test_metrics.json'", "spells 'splits.json'", "spells '/config.yaml'"]


# --- import arrows: no circle in src/lorafit or in bench/ -------------------------------------------------------
def import_arrows(files: list[Path], package: str) -> dict[str, set[str]]:
    """module -> the modules of the same set it imports, anywhere in its file (a lazy import inside a function is
    an arrow too). `package`: "lorafit" for src/lorafit (relative and absolute imports), "" for bench/ scripts,
    which import each other by bare name."""
    names = {p.stem for p in files}
    arrows: dict[str, set[str]] = {p.stem: set() for p in files}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = (node.module or "") if not node.level else f"{package}.{node.module or ''}".rstrip(".")
                if package and base == package:  # from . import a, b: the names are modules
                    targets = [a.name for a in node.names]
                elif package and base.startswith(package + "."):
                    targets = [base.split(".")[1]]
                elif not package:
                    targets = [base.split(".")[0]]
            elif isinstance(node, ast.Import):
                targets = [a.name.split(".")[1] if package and a.name.startswith(package + ".") else
                           a.name.split(".")[0] for a in node.names if package == "" or a.name.startswith(package + ".")]
            arrows[path.stem] |= {t for t in targets if t in names and t != path.stem}
    return arrows


def find_cycle(arrows: dict[str, set[str]]) -> list[str]:
    """One import circle as [a, b, ..., a], or [] when there is none (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str]:
        state[module] = 1
        path.append(module)
        for target in sorted(arrows[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[module] = 2
        path.pop()
        return []

    for module in sorted(arrows):
        if module not in state and (found := visit(module)):
            return found
    return []


def test_no_import_circle_in_src():
    arrows = import_arrows(sorted(PACKAGE.glob("*.py")), "lorafit")
    assert len(arrows) > 30 and "recipe" in arrows["train"]
    assert find_cycle(arrows) == []


def test_no_import_circle_in_bench():
    arrows = import_arrows(sorted((ROOT / "bench").glob("*.py")), "")
    assert "common" in arrows["train_step"]
    assert find_cycle(arrows) == []


def test_the_recipe_imports_no_feature_and_no_speed_path():
    """Distillation, the blend and R-Drop plug in through extensions.py; the forward pass's changes through
    forward_pass.py: the recipe names none of the modules that implement them."""
    arrows = import_arrows(sorted(PACKAGE.glob("*.py")), "lorafit")
    assert not arrows["recipe"] & {"distill", "blend", "tfidf", "rdrop", "frozen", "prefix_cache", "search"}
    assert len((PACKAGE / "recipe.py").read_text(encoding="utf-8").splitlines()) < 600


def test_the_cycle_check_sees_a_lazy_circle(tmp_path):
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from . import a\n")
    (tmp_path / "c.py").write_text("import lorafit.a\n")
    arrows = import_arrows(sorted(tmp_path.glob("*.py")), "lorafit")
    assert arrows == {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert find_cycle(arrows) == ["a", "b", "a"]
