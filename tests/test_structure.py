"""The package's layering (docs/architecture.md): imports point down, no cycles, and models/
stands alone."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from hf_models import save_hf_model

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "sft_jax"

# The packages of the README's "Architecture" section, lowest first: a module may import from
# its own package and the packages below it, never from one above. The top level holds only
# the package's __init__ and the commands' entry points (COMMANDS).
PACKAGES = [
    "sft_jax.core",
    "sft_jax.models",
    "sft_jax.adapters",
    "sft_jax.data",
    "sft_jax.objectives",
    "sft_jax.generation",
    "sft_jax.evaluation",
    "sft_jax.train",
    "sft_jax.planning",
    "sft_jax.workdir",
    "sft_jax.loop",
    "sft_jax.cli",
]
LAYERS = {"sft_jax": 0, **{package: layer for layer, package in enumerate(PACKAGES)}}
# `python -m sft_jax.X` as users type it -> the cli module it runs.
COMMANDS = {
    "sft_jax.chat": "sft_jax.cli.chat",
    "sft_jax.plan": "sft_jax.cli.plan",
    "sft_jax.export": "sft_jax.cli.export",
    "sft_jax.evaluate": "sft_jax.cli.evaluate",
    "sft_jax.data.inspect": "sft_jax.cli.inspect",
    "sft_jax.data.prepare": "sft_jax.cli.prepare",
    "sft_jax.report": "sft_jax.cli.report",
}


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return name.removesuffix(".__init__")


def layer_of(module: str) -> int:
    """The layer of the package that holds the module."""
    if module == "sft_jax" or module in COMMANDS:
        return 0
    package = ".".join(module.split(".")[:2])
    if package not in LAYERS:
        raise AssertionError(f"{module} is in no package of PACKAGES (and docs/architecture.md)")
    return LAYERS[package]


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The sft_jax modules a file imports (anywhere in it, function bodies included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found - {module_name(path)}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(files)) for name, path in files.items()}


def test_every_module_is_in_a_package_and_commands_only_run_their_cli_module():
    graph = import_graph()
    for module in graph:
        layer_of(module)
    top_level = {m for m in graph if m.count(".") == 1 and m not in LAYERS}
    assert top_level == {c for c in COMMANDS if c.count(".") == 1}
    for command, target in COMMANDS.items():
        source = (REPO / (command.replace(".", "/") + ".py")).read_text()
        assert graph[command] == set(), command  # an entry point imports nothing of ours
        assert f'runpy.run_module("{target}", run_name="__main__"' in source, command
        assert target in graph, target


def test_every_import_points_down_or_sideways():
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in import_graph().items()
        for target in targets
        if layer_of(target) > layer_of(module)
    ]
    assert upward == []


def test_nothing_below_the_entry_points_imports_ml_collections():
    """The ConfigDict is the user interface: main.py and the CLIs turn it into a RunSpec
    (core/spec.py); below them only the spec travels (tests/config_guard.py checks the same
    at run time for every test)."""
    readers = []
    for path in PACKAGE.rglob("*.py"):
        if path.is_relative_to(PACKAGE / "cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(name.split(".")[0] == "ml_collections" for name in names):
                readers.append(module_name(path))
    assert readers == []


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    # A package's __init__ re-exporting its own modules is not a cycle.
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join([*path, module]))
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_models_load_without_adapters_data_training_or_checkpoints(tmp_path):
    """`import sft_jax.models` and loading a model from a local Hugging Face directory pull in
    nothing from the layers above models/."""
    save_hf_model("qwen3", tmp_path / "model")
    script = (
        "import sys\n"
        "import sft_jax.models\n"
        f"model = sft_jax.models.from_pretrained({str(tmp_path / 'model')!r})\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('sft_jax'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert result.returncode == 0, result.stderr
    loaded = result.stdout.split()
    assert "sft_jax.models.io.hf" in loaded
    assert [m for m in loaded if layer_of(m) > LAYERS["sft_jax.models"]] == []
    for above in (
        "sft_jax.loop.trainer",
        "sft_jax.adapters.lora",
        "sft_jax.data",
        "sft_jax.workdir.checkpointing",
    ):
        assert above not in loaded


def test_the_architecture_page_names_every_package_and_module():
    """docs/architecture.md's table matches the tree: every package of PACKAGES and every
    module below the top level is named (a moved or new module updates it)."""
    page = (REPO / "docs" / "architecture.md").read_text()
    table = page[: page.index("The path of one batch")]
    missing = [
        p for p in PACKAGES if f"`{p.removeprefix('sft_jax.').replace('.', '/')}/`" not in table
    ]
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        if path.name != "__init__.py" and module not in COMMANDS and f"`{path.name}`" not in table:
            missing.append(module)
    assert missing == []
