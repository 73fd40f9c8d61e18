"""The house: imports point one way. The library's modules stand in layers (`LAYERS`, the data flow of
docs/DESIGN.md) and import only their own layer or those below; no import cycle; nobody inside the package imports
its root; no module imports another module's private name; the CLI imports only the pipeline and the checks that run
before torch, and no CLI command imports another (shared helpers live in cli/app.py and cli/tables.py); one module,
`parts`, knows where a model keeps its layers, attention modules and output head. Read from the source with `ast`,
so imports inside functions and under TYPE_CHECKING count too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "sa_analysis"
CLI_SHARED = {"cli.app", "cli.tables", "cli.main"}
CLI_MAY_IMPORT = ("sa_analysis.pipeline", "sa_analysis.prechecks", "sa_analysis.defaults", "sa_analysis.errors")

# Lowest first. A module's layer is its longest prefix here (names without "sa_analysis."). What a plan's damage is,
# as data, is the planner's (`planner.record`, carried by SharePlan); `damage` measures with the patch in force and
# plans at one budget with the planner, all of it on one floor above both; `search` walks the budgets and proves its
# choice with `validate`.
LAYERS = [
    ["errors", "defaults", "version", "rng", "stats", "io", "aliases", "compat", "tasks", "choices", "progress"],
    ["artefact", "shapes", "gguf_files"],
    ["loading", "data", "parts"],
    ["capture", "metrics"],
    ["streaming"],
    ["report", "analysis"],
    ["planner"],
    ["patch", "shared_model"],
    ["damage"],
    ["validate"],
    ["search"],
    ["plots"],
    ["heal"],
    ["prechecks"],
    ["pipeline"],
]


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


def layer_of(name: str) -> int:
    """The index in `LAYERS` of a library module (its longest listed prefix)."""
    short = name.removeprefix("sa_analysis.")
    best = max(((len(prefix), i) for i, names in enumerate(LAYERS) for prefix in names
                if short == prefix or short.startswith(prefix + ".")), default=None)
    assert best is not None, f"{name} stands in no layer of tests/test_structure.py's LAYERS; place it there"
    return best[1]


def test_every_module_stands_in_a_layer_and_imports_only_downwards():
    known = modules(LIBRARY)
    upwards = [f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})"
               for name, path in known.items() if name != "sa_analysis"
               for target, _ in imports(path, known) if target != "sa_analysis" and layer_of(target) > layer_of(name)]
    assert not upwards, "\n".join(upwards)


def test_nobody_inside_the_package_imports_its_root():
    known = modules(LIBRARY)
    found = [name for name, path in known.items() if name != "sa_analysis"
             for target, _ in imports(path, known) if target == "sa_analysis"]
    assert not found, f"these import the package root (take what they need from its modules): {found}"


def test_the_cli_imports_only_the_pipeline_and_the_checks_before_loading():
    known = {**modules(LIBRARY), **modules(ROOT / "cli")}
    reaching = [f"{name} imports {target}" for name, path in known.items() if name.startswith("cli")
                for target, _ in imports(path, known)
                if target.startswith("sa_analysis") and not target.startswith(CLI_MAY_IMPORT)]
    assert not reaching, "\n".join(reaching)


MODEL_LAYOUT = ("get_decoder(", "get_output_embeddings(", ".self_attn", "register_forward_pre_hook",
                "register_forward_hook", "def decoder_layers", "def attention_modules")


def test_one_module_knows_where_a_model_keeps_its_parts():
    """Decoder layers, attention modules, the output head and the hooks on layers are found only in `parts`."""
    found = [f"{path.relative_to(ROOT)}: {needle}" for path in LIBRARY.rglob("*.py") if path.name != "parts.py"
             for needle in MODEL_LAYOUT if needle in code_of(path)]
    assert not found, "\n".join(found)


def code_of(path: Path) -> str:
    """The module's source without its docstrings and comments (prose may name the layout)."""
    import io
    import tokenize

    text, last_kept = "", None
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    previous = tokenize.NEWLINE
    for token in tokens:
        docstring = token.type == tokenize.STRING and previous in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
        if token.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT) and not docstring:
            words = last_kept in (tokenize.NAME, tokenize.NUMBER) and token.type in (tokenize.NAME, tokenize.NUMBER)
            text += (" " if words else "") + token.string  # as written, without layout: "x=model.get_decoder()"
            last_kept = token.type
        if token.type not in (tokenize.NL, tokenize.COMMENT):
            previous = token.type
    return text


def test_the_layout_check_sees_code_and_not_prose(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('"""Uses get_decoder( in prose."""\n# .self_attn in a comment\nx = model.get_decoder()\n'
                      'def decoder_layers(model):\n    return model . self_attn\n')
    code = code_of(sample)
    assert "get_decoder(" in code and "def decoder_layers" in code and ".self_attn" in code
    sample.write_text('"""Only prose: get_decoder(, .self_attn."""\n# def decoder_layers\n')
    assert not any(needle in code_of(sample) for needle in MODEL_LAYOUT)


JOBS = ("run_heatmap", "run_plan", "run_heads", "run_compare", "run_validate", "run_search", "run_frontier", "run_heal")


def test_every_job_takes_the_same_typed_inputs():
    """Each job names the model (`ModelSpec`) and the text (`TextSpec`) it works on, by type; none takes a loose
    dict of options (`**kwargs`), so what a job needs is read off its signature."""
    import inspect

    import sa_analysis.pipeline as pipeline

    for name in JOBS:
        parameters = inspect.signature(getattr(pipeline, name)).parameters.values()
        annotations = " ".join(str(p.annotation) for p in parameters)
        assert "ModelSpec" in annotations and "TextSpec" in annotations, name
        assert not [p for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD], f"{name} takes **kwargs"
