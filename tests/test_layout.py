"""The package's shape, as docs/architecture.md states it: imports flow one way (no module
imports, at the top or inside a function, a module that imports it back), one public name
names one thing (no public function or class of that name in two modules), and modules and
functions stay short enough to read (500 and 60 lines). Read from the source with ast."""

import ast
import pathlib

import fer_batch

PACKAGE = pathlib.Path(fer_batch.__file__).parent
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 60


def modules() -> dict[str, ast.Module]:
    """{"fer_batch.x": its parsed source} for every module of the package."""
    return {".".join(("fer_batch", *p.relative_to(PACKAGE).with_suffix("").parts)):
            ast.parse(p.read_text(encoding="utf-8"), str(p))
            for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The package's modules that `name` imports anywhere in its source."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .x import y
                base = ".".join(name.split(".")[:-node.level] + ([base] if base else []))
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return (out & known) - {name}


def test_no_import_circle():
    trees = modules()
    graph = {name: imported(name, tree, set(trees)) for name, tree in trees.items()}
    circles, state = [], {}

    def visit(node, path):  # depth-first; a node met again on the current path closes a circle
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert graph["fer_batch.pipeline"], "the import graph came out empty: the walk is wrong"
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_no_public_name_in_two_modules():
    homes: dict[str, list[str]] = {}
    for name, tree in modules().items():
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                homes.setdefault(node.name, []).append(name)
    assert len(homes) > 100, "too few public names: the walk is wrong"
    assert not {n: m for n, m in homes.items() if len(m) > 1}


def test_modules_and_functions_stay_short():
    long_modules, long_functions = [], []
    for name, tree in modules().items():
        if tree.body and tree.body[-1].end_lineno > MAX_MODULE_LINES:
            long_modules.append(f"{name} ({tree.body[-1].end_lineno} lines)")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - first + 1 > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name} "
                                          f"({node.end_lineno - first + 1} lines)")
    assert not long_modules and not long_functions, long_modules + long_functions
