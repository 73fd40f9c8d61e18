"""The house: imports point one way. No import cycle between the library's modules, no module importing another
module's private name, no CLI command module importing another (shared helpers live in cli/app.py and cli/tables.py).
Read from the source with `ast`, so imports inside functions and under TYPE_CHECKING count too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "sa_analysis"
CLI_SHARED = {"cli.app", "cli.tables", "cli.main"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(folder: Path) -> dict[str, Path]:
    return {module_name(p): p for p in folder.rglob("*.py")}


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, str]]:
    """(module imported, name taken from it or '') for every import of a known module in `path`."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name in known]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in known:  # `from . import planner`: the submodule itself
                    found.append((target, ""))
                elif base in known:
                    found.append((base, alias.name))
    return found


def test_no_import_cycle_between_library_modules():
    known = modules(LIBRARY)
    graph = {name: {target for target, _ in imports(path, known) if target != name} for name, path in known.items()}

    def owner(child: str, parent: str) -> bool:  # a package's __init__ re-exporting its own submodules
        return child.startswith(parent + ".")

    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if owner(nxt, node):
                    continue
                if nxt == start:
                    cycles.append(" -> ".join(trail + [start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(cycles))[:10])


def test_no_private_name_is_imported_from_another_module():
    known = modules(LIBRARY)
    private = [f"{name} imports {target}.{taken}" for name, path in known.items()
               for target, taken in imports(path, known) if taken.startswith("_") and not taken.startswith("__") and target != name]
    assert not private, "\n".join(private)


def test_no_cli_command_imports_another_command():
    known = {**modules(LIBRARY), **modules(ROOT / "cli")}
    commands = {name: path for name, path in known.items() if name.startswith("cli.") and name not in CLI_SHARED}
    crossing = [f"{name} imports {target}" for name, path in commands.items() for target, _ in imports(path, known)
                if target.startswith("cli.") and target not in CLI_SHARED and target != name]
    assert not crossing, "\n".join(crossing)
