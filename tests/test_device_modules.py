"""Structure of device_app (read with ast, nothing imported): no import cycles, no optional-method
probing of the secure-aggregation hooks, and no import of the server."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "device_app"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """device_app module -> the device_app modules it imports (anywhere in the file, functions included)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in files)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module in files:
                    deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in files)
        graph[name] = deps - {name}
    return graph


def test_device_app_has_no_import_cycles() -> None:
    graph = _imports()
    state: dict[str, str] = {}  # "visiting" | "done"
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "visiting"
        for dep in sorted(graph[node]):
            if state.get(dep) == "visiting":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_device_app_never_probes_for_optional_methods_and_never_imports_the_server() -> None:
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id != "hasattr", f"{path.name}:{node.lineno} probes with hasattr"
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module.split(".")[0] != "server", f"{path.name}:{node.lineno} imports the server"
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] != "server" for a in node.names), f"{path.name} imports the server"

