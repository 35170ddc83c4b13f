"""The package's layering (README, "Architecture"): imports point down, no cycles, and models/
stands alone."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from hf_models import save_hf_model

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "sft_jax"

# The layers of the README's "Architecture" section, lowest first; a module may import from
# its own layer and the ones below it, never from above.
LAYERS = {
    "sft_jax": 0,
    "sft_jax.errors": 0,
    "sft_jax.cli": 0,
    "sft_jax.models": 1,  # and everything under it
    "sft_jax.lora": 2,
    "sft_jax.prompts": 2,
    "sft_jax.adalora": 2,
    "sft_jax.generate": 2,
    "sft_jax.samples": 2,
    "sft_jax.data": 3,
    "sft_jax.loss": 4,
    "sft_jax.optim": 4,
    "sft_jax.step": 4,
    "sft_jax.moe_loss": 4,
    "sft_jax.preference": 4,
    "sft_jax.reward": 4,
    "sft_jax.sharding": 5,
    "sft_jax.memory_plan": 5,
    "sft_jax.model_setup": 5,
    "sft_jax.compile_plan": 5,
    "sft_jax.kernel_choice": 5,
    "sft_jax.config_check": 5,
    "sft_jax.distributed": 5,
    "sft_jax.hlo_stats": 5,
    "sft_jax.checkpointing": 6,
    "sft_jax.signals": 6,
    "sft_jax.rundir": 6,
    "sft_jax.bucket_mirror": 6,
    "sft_jax.metrics": 6,
    "sft_jax.prefetch": 6,
    "sft_jax.evaluation": 6,
    "sft_jax.export": 6,
    "sft_jax.trainer": 6,
    "sft_jax.plan_search": 6,
    "sft_jax.plan_estimate": 6,
    "sft_jax.plan_depth": 6,
    "sft_jax.chat": 7,
    "sft_jax.plan": 7,
    "sft_jax.data.inspect": 7,
    "sft_jax.data.prepare": 7,
}


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return name.removesuffix(".__init__")


def layer_of(module: str) -> int:
    """The layer of the longest entry of LAYERS that names the module or a package above it."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in LAYERS:
            return LAYERS[".".join(parts[:end])]
    raise AssertionError(f"{module} has no layer: add it to LAYERS and the README")


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


def test_every_import_points_down_or_sideways():
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in import_graph().items()
        for target in targets
        if layer_of(target) > layer_of(module)
    ]
    assert upward == []


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
    assert "sft_jax.models.hf_io" in loaded
    assert [m for m in loaded if layer_of(m) > 1] == []
    for above in ("sft_jax.trainer", "sft_jax.lora", "sft_jax.data", "sft_jax.checkpointing"):
        assert above not in loaded
