"""The package's layering, kept by tests: which module of r1lab may import which.

Packages, low to high: a module may import modules of its own package and of lower ones, never of a higher one.
The imports counted are the ones that run: at module level and inside functions (a late import is still a
dependency), not those under `if TYPE_CHECKING:` (annotations only), nor the root package's `__getattr__`, which
loads the Python API (r1lab/commands/api.py) when `r1lab.grpo` is first asked for, not when r1lab is imported. A failure names the importing file, the line
and the module it imports.
"""

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "r1lab"
# suggest: the "did you mean" of error messages, a leaf every layer may use
LAYERS = ["suggest", "model", "rewards", "config", "engine", "cpu", "train", "commands", "serve", "cli", "__main__"]
# what the model and the engine must never reach, the CPU speed-ups included (decode kernel, allocator, build helper)
ABOVE_MODEL_AND_ENGINE = ["r1lab.train", "r1lab.commands", "r1lab.serve", "r1lab.cpu"]
MAX_TOP_ENTRIES = 12


def module_names(root: Path) -> dict[str, Path]:
    """Every module of the package at root, by dotted name (a package by its __init__.py)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class Imports(ast.NodeVisitor):
    """(imported module, line, inside a function) for each import that runs, of modules of the package."""

    def __init__(self, module: str, is_package: bool, modules: set[str]):
        self.package = module if is_package else module.rpartition(".")[0]
        self.modules, self.found, self.depth = modules, [], 0

    def resolve(self, name: str) -> str | None:
        """The module of the package that `name` is, or the innermost one that holds it (None: not the package's)."""
        while name and name not in self.modules:
            name = name.rpartition(".")[0]
        return name or None

    def add(self, name: str, node: ast.AST) -> None:
        target = self.resolve(name)
        if target and (target, node.lineno, self.depth > 0) not in self.found:  # one per module a line imports
            self.found.append((target, node.lineno, self.depth > 0))

    def visit_If(self, node: ast.If) -> None:
        if is_type_checking(node.test):  # annotations only: the body never runs
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_FunctionDef(self, node) -> None:
        if self.package == PACKAGE.name and getattr(node, "name", "") == "__getattr__":
            return  # the root's lazy attributes (PEP 562: r1lab.grpo) load the API on use, never on import
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_Lambda = visit_FunctionDef

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: from the package of this module, up level - 1
            anchor = self.package.split(".")
            anchor = anchor[:len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, *([base] if base else [])])
        for alias in node.names:  # `from r1lab.cpu import decode_kernel` imports the module r1lab.cpu.decode_kernel
            self.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in self.modules else base, node)

    def visit_Call(self, node: ast.Call) -> None:  # importlib.import_module("r1lab....") with a literal name
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name == "import_module" and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            self.add(node.args[0].value, node)
        self.generic_visit(node)


@functools.cache  # the package's graph is read once for its three tests (a planted package is a new root)
def import_graph(root: Path) -> tuple[dict[str, Path], dict[str, list[tuple[str, int, bool]]]]:
    """The modules of the package at root, and for each the (module, line, in a function) it imports."""
    modules = module_names(root)
    graph = {}
    for name, path in modules.items():
        visitor = Imports(name, path.name == "__init__.py", set(modules))
        visitor.visit(ast.parse(path.read_text(), str(path)))
        graph[name] = [edge for edge in visitor.found if edge[0] != name]
    return modules, graph


def layer(module: str) -> int | None:
    """The module's place in LAYERS; -1 for the root package (it runs first, under every import of the package)."""
    parts = module.split(".")
    if len(parts) == 1:
        return -1
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def source(modules: dict[str, Path], module: str, line: int, late: bool) -> str:
    """Where an import is: the file from the package's folder on, and the line."""
    path = modules[module]
    root = path
    while root.parent.name and (root.parent / "__init__.py").exists():
        root = root.parent
    return f"{path.relative_to(root.parent)}:{line}" + (" (inside a function)" if late else "")


def layering_violations(root: Path) -> list[str]:
    modules, graph = import_graph(root)
    found = []
    for module, edges in graph.items():
        if layer(module) is None:
            found.append(f"{module} ({source(modules, module, 1, False)}) is in no layer of {LAYERS}")
            continue
        for target, line, late in edges:
            if layer(target) is not None and layer(target) > layer(module):
                found.append(f"{source(modules, module, line, late)}: {module} imports {target}, but "
                             f"{LAYERS[layer(module)] if layer(module) >= 0 else root.name} is below "
                             f"{LAYERS[layer(target)]}")
    return found


def forbidden_imports(root: Path, importers: list[str], forbidden: list[str]) -> list[str]:
    """Each import by which a module under `importers` reaches one under `forbidden`: directly, or through modules
    outside `importers` (an import between two importers is left to the one that leaves them)."""
    modules, graph = import_graph(root)

    def under(module, prefixes):
        return any(module == p or module.startswith(p + ".") for p in prefixes)

    def reached(start):
        """Every module start leads to without passing through an importer (itself included), each with the chain of
        imports to it."""
        chains, frontier = {start: [start]}, [start]
        while frontier:
            step = []
            for f in frontier:
                for t, _, _ in graph[f]:
                    if t not in chains and not under(t, importers):
                        chains[t] = chains[f] + [t]
                        step.append(t)
            frontier = step
        return chains

    found = []
    for module, edges in graph.items():
        if not under(module, importers):
            continue
        for target, line, late in edges:
            if under(target, importers):
                continue
            bad = {m: chain for m, chain in reached(target).items() if under(m, forbidden)}
            if not bad:
                continue
            text = f"{source(modules, module, line, late)}: {module} imports {target}"
            first = target if target in bad else min(bad, key=lambda m: (len(bad[m]), m))
            if first != target:
                text += f", which reaches {first} through {' -> '.join(bad[first])}"
            further = sorted(set(bad) - {first})
            if further:
                text += f" (and through it {', '.join(further)})"
            found.append(text)
    return found


def import_circles(root: Path) -> list[str]:
    """Each circle of imports between the package's modules, as the chain of imports that closes it."""
    modules, graph = import_graph(root)
    targets = {m: sorted({t for t, _, _ in edges}) for m, edges in graph.items()}
    # Tarjan's strongly connected components
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in targets[v]:
            if w not in index:
                connect(w)
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
            components.append(component)

    for v in sorted(targets):
        if v not in index:
            connect(v)
    circles = []
    for component in components:
        if len(component) < 2:
            continue
        members, start = set(component), min(component)
        # the shortest way back to start inside the component
        previous, frontier = {start: None}, [start]
        while frontier and start not in [t for f in frontier for t in targets[f]]:
            step = []
            for f in frontier:
                for t in targets[f]:
                    if t in members and t not in previous:
                        previous[t] = f
                        step.append(t)
            frontier = step
        last = next(f for f in frontier if start in targets[f])
        chain = [last]
        while previous[chain[-1]] is not None:
            chain.append(previous[chain[-1]])
        chain = chain[::-1] + [start]
        links = []
        for a, b in zip(chain, chain[1:]):
            line, late = next((line, late) for t, line, late in graph[a] if t == b)
            links.append(f"{a} imports {b} ({source(modules, a, line, late)})")
        circles.append(f"circle of {len(component)} modules {sorted(component)}: " + ", ".join(links))
    return circles


def top_entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != "__pycache__")


# --- the package itself ---------------------------------------------------------------------------------------------

def test_no_import_circles_between_modules():
    circles = import_circles(PACKAGE)
    if circles:
        pytest.fail("import circles:\n" + "\n".join(circles), pytrace=False)


def test_no_package_imports_a_higher_one():
    violations = layering_violations(PACKAGE)
    if violations:
        pytest.fail(f"imports against the layering {' < '.join(LAYERS)}:\n" + "\n".join(violations), pytrace=False)


def test_model_and_engine_import_nothing_of_training_commands_serving_or_the_cpu_speedups():
    found = forbidden_imports(PACKAGE, ["r1lab.model", "r1lab.engine"], ABOVE_MODEL_AND_ENGINE)
    if found:
        pytest.fail("the model and the engine import:\n" + "\n".join(found), pytrace=False)


def test_the_top_of_the_package_stays_small():
    entries = top_entries(PACKAGE)
    assert len(entries) <= MAX_TOP_ENTRIES, f"{len(entries)} entries at the top of r1lab/ (at most " \
                                            f"{MAX_TOP_ENTRIES}): {entries}"


# --- the checks themselves, on a planted package --------------------------------------------------------------------

@pytest.fixture
def planted(tmp_path):
    """A small package named r1lab laid out like the real one, that follows the layering; tests plant violations."""
    root = tmp_path / "r1lab"
    files = {
        "__init__.py": "",
        "__main__.py": "from r1lab.cli import main\n",
        "cli.py": "import importlib\nfrom r1lab.commands import demo\n",
        "config.py": "from r1lab.rewards import rules\n",
        "model/__init__.py": "",
        "model/layers.py": "from typing import TYPE_CHECKING\nimport torch\nif TYPE_CHECKING:\n"
                           "    from r1lab.model.architecture import Config\n    from r1lab.train import phases\n",
        "model/architecture.py": "from r1lab.model import layers\n",
        "rewards/__init__.py": "",
        "rewards/rules.py": "from . import tasks\n",
        "rewards/tasks.py": "import r1lab.model.architecture\n",
        "engine/__init__.py": "",
        "engine/engine.py": "from r1lab.model.layers import MLP\nfrom r1lab.config import X\n",
        "cpu/__init__.py": "",
        "cpu/decode_kernel.py": "",
        "train/__init__.py": "",
        "train/phases.py": "from r1lab.cpu import decode_kernel\n",
        "commands/__init__.py": "",
        "commands/demo.py": "from ..train import phases\n",
        "serve/__init__.py": "",
        "serve/app.py": "def serve():\n    from r1lab.commands.demo import run\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_planted_package_passes(planted):
    assert import_circles(planted) == [] and layering_violations(planted) == []
    assert forbidden_imports(planted, ["r1lab.model", "r1lab.engine"], ABOVE_MODEL_AND_ENGINE) == []
    _, graph = import_graph(planted)
    assert [t for t, _, _ in graph["r1lab.rewards.rules"]] == ["r1lab.rewards.tasks"]  # relative import resolved
    assert [t for t, _, _ in graph["r1lab.commands.demo"]] == ["r1lab.train.phases"]
    assert graph["r1lab.model.layers"] == []  # TYPE_CHECKING imports do not count


def test_a_late_import_upward_is_named_with_its_line(planted):
    (planted / "model" / "layers.py").write_text("def f():\n    from r1lab.cpu import decode_kernel as k\n")
    assert layering_violations(planted) == [
        "r1lab/model/layers.py:2 (inside a function): r1lab.model.layers imports r1lab.cpu.decode_kernel, "
        "but model is below cpu"]
    assert forbidden_imports(planted, ["r1lab.model", "r1lab.engine"], ABOVE_MODEL_AND_ENGINE) == [
        "r1lab/model/layers.py:2 (inside a function): r1lab.model.layers imports r1lab.cpu.decode_kernel"]


def test_an_import_circle_is_named_link_by_link(planted):
    (planted / "cpu" / "decode_kernel.py").write_text("import importlib\nimportlib.import_module('r1lab.train.phases')\n")
    assert import_circles(planted) == [
        "circle of 2 modules ['r1lab.cpu.decode_kernel', 'r1lab.train.phases']: "
        "r1lab.cpu.decode_kernel imports r1lab.train.phases (r1lab/cpu/decode_kernel.py:2), "
        "r1lab.train.phases imports r1lab.cpu.decode_kernel (r1lab/train/phases.py:1)"]
    assert layering_violations(planted) == [
        "r1lab/cpu/decode_kernel.py:2: r1lab.cpu.decode_kernel imports r1lab.train.phases, but cpu is below train"]


def test_a_module_outside_the_layers_and_a_crowded_top_are_caught(planted):
    (planted / "extra.py").write_text("")
    assert layering_violations(planted) == [f"r1lab.extra (r1lab/extra.py:1) is in no layer of {LAYERS}"]
    assert len(top_entries(planted)) == 12 == MAX_TOP_ENTRIES
    (planted / "more.py").write_text("")
    assert len(top_entries(planted)) > MAX_TOP_ENTRIES


def test_the_model_reaching_the_cpu_through_a_lower_package_is_named_with_the_chain(planted):
    (planted / "rewards" / "tasks.py").write_text("from r1lab.cpu.decode_kernel import matmul\n")
    found = forbidden_imports(planted, ["r1lab.model", "r1lab.engine"], ABOVE_MODEL_AND_ENGINE)
    assert found == ["r1lab/engine/engine.py:2: r1lab.engine.engine imports r1lab.config, which reaches "
                     "r1lab.cpu.decode_kernel through r1lab.config -> r1lab.rewards.rules -> r1lab.rewards.tasks -> "
                     "r1lab.cpu.decode_kernel"]
