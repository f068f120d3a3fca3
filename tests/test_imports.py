"""The house rules as a test: imports flow recipes → engine → {loaders, kernels}; loaders and kernels never import
engine or each other; no module imports itself back through others (imports inside functions included)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "kernels", "loaders")
ALLOWED = {"engine": {"engine", "kernels", "loaders"}, "kernels": {"kernels"}, "loaders": {"loaders"},
           "recipes": {"engine"}, "api": {"engine"}}  # api/ is the `cellssl` package itself


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Modules of ours that `path` imports anywhere in its body, as dotted names without the cellssl prefix."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            t = t.removeprefix("cellssl.")
            if t.split(".")[0] in PACKAGES and (ROOT / t.replace(".", "/")).with_suffix(".py").is_file() or (
                    ROOT / t.replace(".", "/") / "__init__.py").is_file():
                found.add(t)
    return found - {name}


def graph() -> dict[str, set[str]]:
    files = [p for pkg in (*PACKAGES, "recipes", "api") for p in (ROOT / pkg).rglob("*.py")]
    return {module_name(p): imports(p) for p in files}


def test_layers():
    bad = [(m, t) for m, targets in graph().items() for t in targets
           if t.split(".")[0] not in ALLOWED[m.split(".")[0]]]
    assert bad == [], bad


def test_no_circles():
    g = graph()
    # a package's __init__ re-exports its modules: edges into an __init__ from its own modules are not a circle
    def edges(m):
        return {t for t in g.get(m, ()) if not m.startswith(t + ".")}

    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for t in edges(m):
            if state.get(t) == "open":
                cycles.append(path[path.index(t):] + [t] if t in path else [m, t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in g:
        if m not in state:
            visit(m, [m])
    assert cycles == [], cycles
