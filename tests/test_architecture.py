"""The import structure, read from the source (ast), not by importing anything.

* No import cycles among the modules of server/ and of device_app/. Every import counts, module-level
  and function-local alike (a local import is still a dependency, merely a late one); imports under
  `if TYPE_CHECKING:` do not (they never run).
* The packages stay apart: server/ never imports device_app/ or tff_sim/ and neither of them imports
  server/; models/ (the shared core) imports none of them.
* Layers in server/: the HTTP layer (the app, server/http/, route modules, the OpenAPI contract) is on
  top and nothing below imports it or a web framework; the pure algorithm modules (round types,
  strategies and DP wrappers, the SecAgg protocol, evaluation rules, aggregation math) import no
  services, storage or I/O.
* No module of server/ over 500 lines unless its docstring says why.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "device_app", "models", "tff_sim")
WEB = ("fastapi", "starlette", "pydantic", "uvicorn")
HTTP_LAYER = ("server.app", "server.http", "server.secagg.routes", "server.paillier.routes",
              "server.telemetry.routes", "server.contract", "server.__main__", "server.keyholder",
              "server.runtime_tuning")  # runtime_tuning patches uvicorn's request body handling
PURE = ("server.round", "server.strategy", "server.secagg.protocol", "server.evaluation", "server.aggregation",
        "server.errors", "server.paillier.protocol")
PURE_ALLOWED = PURE + ("server.config", "server.metrics")  # plain data / counters, no I/O
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[module_name(path)] = path
    return out


MODULES = all_modules()


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside `if TYPE_CHECKING:` blocks."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                for sub in ast.walk(inner):
                    skip.add(id(sub))
    return skip


def imports_of(name: str, path: Path) -> set[str]:
    """Every module `name` imports: our modules resolved to the module (a `from pkg import submodule`
    is the submodule), anything else by its top-level name."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.add(_resolve(alias.name))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in MODULES else _resolve(base))
    out.discard(name)
    return out


def _resolve(dotted: str) -> str:
    """The longest prefix of `dotted` that is one of our modules, else its top-level name."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in MODULES:
            return candidate
    return parts[0]


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def _in(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def cycles(graph: dict[str, set[str]], nodes: list[str]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), restricted to `nodes`."""
    allowed = set(nodes)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v] & allowed):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(allowed):
        if v not in index:
            visit(v)
    return found


def _edges_between(members: list[str]) -> list[str]:
    return [f"{a} -> {b}" for a in members for b in sorted(GRAPH[a]) if b in members]


@pytest.mark.parametrize("package", ["server", "device_app"])
def test_no_import_cycles(package: str) -> None:
    found = cycles(GRAPH, [m for m in MODULES if _in(m, (package,))])
    assert not found, "import cycles:\n" + "\n".join(" | ".join(_edges_between(c)) for c in found)


@pytest.mark.parametrize("package, forbidden", [
    ("server", ("device_app", "tff_sim")),
    ("device_app", ("server",)),
    ("tff_sim", ("server",)),
    ("models", ("server", "device_app", "tff_sim")),
])
def test_packages_stay_apart(package: str, forbidden: tuple[str, ...]) -> None:
    bad = [f"{m} -> {i}" for m in MODULES if _in(m, (package,)) for i in sorted(GRAPH[m]) if _in(i, forbidden)]
    assert not bad, "\n".join(bad)


def test_only_the_http_layer_imports_the_http_layer_and_web_frameworks() -> None:
    below = [m for m in MODULES if _in(m, ("server",)) and not _in(m, HTTP_LAYER) and m != "server"]
    bad = [f"{m} -> {i}" for m in below for i in sorted(GRAPH[m]) if _in(i, HTTP_LAYER) or i in WEB]
    assert not bad, "\n".join(bad)


def test_pure_modules_do_no_io() -> None:
    pure = [m for m in MODULES if _in(m, PURE)]
    assert "server.secagg.protocol" in pure and "server.strategy.dp" in pure
    bad = [f"{m} -> {i}" for m in pure for i in sorted(GRAPH[m])
           if _in(i, ("server", "device_app", "tff_sim")) and not _in(i, PURE_ALLOWED)]
    bad += [f"{m} -> {i}" for m in pure for i in sorted(GRAPH[m]) if i in WEB + ("httpx", "sqlite3")]
    assert not bad, "\n".join(bad)


def test_server_modules_are_small_or_say_why() -> None:
    big = []
    for name, path in MODULES.items():
        if not _in(name, ("server",)):
            continue
        text = path.read_text(encoding="utf-8")
        lines = text.count("\n")
        doc = ast.get_docstring(ast.parse(text)) or ""
        if lines > MAX_LINES and "lines" not in doc:  # the reason names the size: "... is N lines because ..."
            big.append(f"{name}: {lines} lines")
    assert not big, "\n".join(big)


def test_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph, list(graph)) == [["a", "b", "c"]]
    assert cycles(graph, ["a", "b", "d", "e"]) == []


def test_the_graph_sees_real_imports() -> None:
    """Guards the parser itself: known edges, function-local ones included, and TYPE_CHECKING skipped."""
    assert "server.services" in GRAPH["server.app"]
    assert "server.secagg.protocol" in GRAPH["server.secagg.service"]
    assert "server.rounds" not in GRAPH["server.round_close"]  # only under TYPE_CHECKING
    assert "server.secagg" in GRAPH["server.services"]
