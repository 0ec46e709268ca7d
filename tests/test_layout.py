"""The package's shape, kept by tests: shared code lives in shared modules, not in a command's module."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "r1lab"
RUNS_GRPO = {"cli.py", "demo.py", "distill.py", "pipeline.py", "api.py"}  # what runs GRPO training (a stage, the API)


def imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """(module, names, at module level) for every `from r1lab... import` in a file."""
    tree = ast.parse(path.read_text())
    typing_only = [n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING"]
    top = set(map(id, tree.body)) | {id(n) for block in typing_only for n in block.body}
    return [(node.module, [a.name for a in node.names], id(node) in top)
            for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("r1lab")]


def test_the_grpo_module_is_imported_only_to_run_grpo():
    for path in PACKAGE.rglob("*.py"):
        for module, names, _ in imports(path):
            if module == "r1lab.train.grpo":
                assert path.name in RUNS_GRPO and names == ["train"], f"{path.name} imports {names} from r1lab.train.grpo"


def test_prompt_text_is_made_in_one_module():
    for path in PACKAGE.rglob("*.py"):
        if path.name == "templates.py":
            continue
        source = path.read_text()
        assert "A conversation between User and Assistant" not in source, path
        assert "def apply_chat_template" not in source and "jinja2" not in source, path


def test_imports_are_at_module_level_except_optional_ones():
    # Optional dependencies (the server, plotting, transformers) are imported where used; everything of the package
    # itself is imported at the top, so a module's first lines show what it depends on.
    for path in PACKAGE.rglob("*.py"):
        late = [module for module, _, top in imports(path) if not top]
        # the CLI: the server's extra, and the malloc relaunch (it imports torch, which `r1lab --help` does without);
        # the root package: the Python API, loaded when first asked for (PEP 562)
        allowed = {"cli.py": {"r1lab.serve.app", "r1lab.cpu.process"}, "__init__.py": {"r1lab.commands"}}.get(
            str(path.relative_to(PACKAGE)), set())
        assert set(late) <= allowed, f"{path.relative_to(PACKAGE)} imports {late} inside a function"
