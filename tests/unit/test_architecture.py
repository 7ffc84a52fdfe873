"""The house's rules, checked on the source itself: dependencies between the product's modules
run one way (no import cycles, lazy imports inside functions included: a cycle through a
function-level import is still a design cycle, only hidden)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PRODUCT_PACKAGES = ("daemon", "families", "plugins")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def product_modules() -> dict[str, Path]:
    return {_module_name(path): path for package in PRODUCT_PACKAGES
            for path in (REPO / package).rglob("*.py")
            if "migrations" not in path.relative_to(REPO).parts}


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The product modules `name` imports, at module level or inside functions; imports
    under `if TYPE_CHECKING:` are for annotations only and do not count."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [base, *(f"{base}.{alias.name}" for alias in child.names)]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.add(target)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return cycles


def test_the_checker_finds_a_cycle() -> None:
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_inside_the_product_packages() -> None:
    modules = product_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    runner = "daemon.runtime.runner"
    assert runner in graph and graph[runner], "the checker read nothing"
    cycles = import_cycles(graph)
    assert cycles == [], "import cycles (each group imports itself round): " + "; ".join(
        " <-> ".join(group) for group in cycles)


def concern_of(module: str) -> str:
    """The folder a core module lives in ("daemon.queue.lifecycle" -> "queue"); a module at
    the top of daemon/ is its own concern ("daemon.config" -> "config")."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def concern_graph(modules: dict[str, Path]) -> dict[str, dict[str, list[str]]]:
    """Which concern of daemon/ imports which, with the module imports that make each edge."""
    graph: dict[str, dict[str, list[str]]] = {}
    for name, path in modules.items():
        if not name.startswith("daemon"):
            continue
        source = concern_of(name)
        graph.setdefault(source, {})
        for target in imports_of(name, path, modules):
            if target.startswith("daemon") and concern_of(target) != source:
                graph[source].setdefault(concern_of(target), []).append(f"{name} -> {target}")
    return graph


def test_the_concerns_of_daemon_depend_one_way() -> None:
    """The folder tree is the architecture: no folder of daemon/ imports, through any module,
    a folder that imports it back (so each can be read knowing only the ones below it)."""
    graph = concern_graph(product_modules())
    assert {"contract", "store", "queue", "render", "output", "intake", "web", "cli"} <= set(
        graph), "the checker read nothing"
    cycles = import_cycles({source: set(targets) for source, targets in graph.items()})
    assert cycles == [], "folders that import each other round: " + "; ".join(
        " <-> ".join(group) + " (" + ", ".join(
            edge for a in group for b in group if a != b for edge in graph[a].get(b, [])) + ")"
        for group in cycles)


def test_the_concern_checker_sees_a_cycle_through_two_modules(tmp_path: Path) -> None:
    for name, body in {"a/__init__.py": "", "a/one.py": "from daemon.b.two import x\n",
                       "b/__init__.py": "", "b/three.py": "",
                       "b/two.py": "def f():\n    from daemon.a.one import y\n"}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(body)
    modules = {"daemon.a.one": tmp_path / "a/one.py", "daemon.b.two": tmp_path / "b/two.py",
               "daemon.b.three": tmp_path / "b/three.py"}
    graph = concern_graph(modules)
    assert import_cycles({s: set(t) for s, t in graph.items()}) == [["a", "b"]]


# The folders of daemon/ from the bottom layer up, as docs/ARCHITECTURE.md lists them ("daemon"
# is daemon/__init__.py): a module may import from its own folder and the ones before it.
LAYERS = ("daemon", "presets", "config", "folders", "formats", "contract", "store", "library",
          "resolver", "queue", "output", "render", "intake", "web", "runtime", "cli", "plugin_api")


def test_each_folder_imports_only_the_layers_below_it() -> None:
    graph = concern_graph(product_modules())
    assert set(graph) <= set(LAYERS), f"a folder missing from LAYERS: {set(graph) - set(LAYERS)}"
    upward = [edge for source, targets in graph.items() for target, edges in targets.items()
              if LAYERS.index(target) > LAYERS.index(source) for edge in edges]
    assert upward == [], "imports from a higher layer: " + "; ".join(upward)
