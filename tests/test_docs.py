"""Docs that cannot go stale: every flag and command the README and docs/ write exists, every
metric named there is one the trainer writes (and every one it writes is in the reference),
the generated references match their sources, and output excerpts come from the script."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest
from test_structure import COMMANDS

from sft_jax.core.spec import RunSpec
from sft_jax.workdir.metric_names import METRICS, documented

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
# Written on purpose although they do not exist: the mistyped field of an error message.
NOT_FIELDS = {"train.learning_rat"}
# Flags every command takes (absl's, and cli.define_debug_flag's).
COMMON_FLAGS = {"debug", "verbosity", "helpfull", "help"}


def _refresh_docs():
    spec = importlib.util.spec_from_file_location("refresh_docs", REPO / "scripts/refresh_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config_fields() -> set[str]:
    from configs import base

    def walk(tree: dict, prefix: str) -> set[str]:
        out = set()
        for key, value in tree.items():
            out.add(prefix + key)
            if isinstance(value, dict):
                out |= walk(value, prefix + key + ".")
        return out

    return walk(RunSpec.of(base.get_config()).to_dict(), "")


def _defined_flags(module: str) -> set[str]:
    path = REPO / (module.replace(".", "/") + ".py")
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr.startswith("DEFINE_")
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names.add(node.args[0].value)
    return names


def _text(page: Path) -> str:
    return page.read_text().replace("\\\n", " ")  # shell line continuations join their lines


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_flag_written_is_a_field(page):
    fields = _config_fields()
    written = set(re.findall(r"--config\.([a-z_][a-z0-9_.]*[a-z0-9_])", _text(page)))
    assert sorted(written - fields - NOT_FIELDS) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_and_its_flags_exist(page):
    problems = []
    for line in _text(page).splitlines():
        for command, flags_text in re.findall(r"python -m (sft_jax[\w.]*)([^`|#]*)", line):
            if command not in COMMANDS:
                problems.append(f"python -m {command}: no such command")
                continue
            defined = _defined_flags(COMMANDS[command]) | COMMON_FLAGS | {"config"}
            for flag in re.findall(r"(?<![\w-])--(?!config\.)([a-z_]+)", flags_text):
                if flag not in defined and not (flag.startswith("no") and flag[2:] in defined):
                    problems.append(f"python -m {command} --{flag}: not a flag of {command}")
        for flags_text in re.findall(r"python main\.py([^`|#]*)", line):
            for flag in re.findall(r"(?<![\w-])--(?!config\.)([a-z_]+)", flags_text):
                if flag not in _defined_flags("main") | COMMON_FLAGS | {"config"}:
                    problems.append(f"python main.py --{flag}: not a flag of main.py")
    assert problems == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_metric_named_is_documented(page):
    named = set(re.findall(r"`((?:train|eval)/[A-Za-z0-9_/<>]+)`", _text(page)))
    keys = {metric.key for metric in METRICS}
    assert sorted(name for name in named if not (documented(name) or name in keys)) == []


def test_every_documented_metric_is_written_by_the_code():
    """Each reference key's own part (after train/ or eval/, up to a <placeholder>) is a string
    the package writes; the writer itself refuses undocumented keys in the tests
    ($SFT_JAX_STRICT_METRICS, tests/conftest.py)."""
    literals = set()
    for path in (REPO / "sft_jax").rglob("*.py"):
        if path.name == "metric_names.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                literals.add(node.value)
    source = "\n".join(literals)
    missing = []
    for metric in METRICS:
        own = metric.key.split("/", 1)[1].split("<")[0].rstrip("/_") or metric.key.split("/")[0]
        if own not in source:
            missing.append(metric.key)
    assert missing == []


def test_the_generated_references_are_up_to_date():
    refresh = _refresh_docs()
    for path, text in refresh.references().items():
        assert path.read_text() == text, f"{path}: run python scripts/refresh_docs.py"


def test_output_excerpts_come_from_the_script():
    """Program output in the README and docs sits in <!-- output: NAME --> blocks that
    scripts/refresh_docs.py --excerpts fills from real runs, stamped with command, machine
    and date."""
    refresh = _refresh_docs()
    blocks = [(page, m) for page in PAGES for m in refresh.BLOCK.finditer(page.read_text())]
    assert {m.group("name") for _, m in blocks} == set(refresh.EXCERPTS)
    for page, match in blocks:
        body = match.group("body")
        assert re.match(r"`python .*` on .*, \d{4}-\d{2}-\d{2}:\n\n```\n", body), page
        assert body.count("```") == 2, page


def test_no_development_notes_in_user_docs():
    notes = re.compile(
        r"the issue|was lent|this work|shared \d-core|on this machine|/tmp/\w+\d+\b|\bl\.\d+\b"
        r"|\.py:\d+|\b\d{1,2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]* 20\d\d",
        re.IGNORECASE,
    )
    found = [
        f"{page.relative_to(REPO)}:{number}: {line.strip()[:80]}"
        for page in PAGES
        for number, line in enumerate(page.read_text().splitlines(), 1)
        if notes.search(line) and "<!-- output" not in line
    ]
    assert found == []
