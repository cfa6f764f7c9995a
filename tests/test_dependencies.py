"""The dependency rules of docs/design.md, read from the source (every import, also the ones
inside functions): no import loops in the library's lower layers, data never imports models,
pipelines imports nothing of ffhq_ldm, ffhq_ldm never imports the training scripts."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute, wherever the import statement is."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = node.module or ""
            target = f"{base}.{module}".strip(".") if node.level else module
            found.add(target)
            # "from . import x" / "from .pkg import mod": x may be a module itself
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def graph(folders: list[str]) -> dict[str, set[str]]:
    files = [p for folder in folders for p in (ROOT / folder).rglob("*.py")]
    names = {module_name(p) for p in files}
    return {module_name(p): {m for m in imports_of(p) if m in names} for p in files}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_relative_imports_resolve():
    assert imports_of(ROOT / "ffhq_ldm" / "data" / "images.py") >= {"ffhq_ldm.data.decode",
                                                                   "ffhq_ldm.data.scan"}


@pytest.mark.parametrize("folders", [["ffhq_ldm/data"], ["ffhq_ldm/data", "ffhq_ldm/models",
                                                         "ffhq_ldm/losses", "pipelines"],
                                     ["ffhq_ldm", "pipelines", "training"]])
def test_no_import_loops(folders):
    assert find_cycle(graph(folders)) is None


def test_a_planted_loop_is_found():
    """The whole package's graph with one planted edge back (sampling -> cli, while cli imports
    sampling) has a loop: the test above would see one."""
    edges = graph(["ffhq_ldm", "pipelines", "training"])
    assert "ffhq_ldm.sampling" in edges["ffhq_ldm.cli"]
    edges["ffhq_ldm.sampling"] = edges["ffhq_ldm.sampling"] | {"ffhq_ldm.cli"}
    assert find_cycle(edges) is not None


def test_the_cli_and_evaluation_reach_pipelines_only_through_sampling():
    for module, targets in graph(["ffhq_ldm", "pipelines"]).items():
        if module.startswith(("ffhq_ldm.cli", "ffhq_ldm.evaluation")):
            assert not {t for t in targets if t.startswith("pipelines")}, module


def test_data_never_imports_models():
    for module, targets in graph(["ffhq_ldm"]).items():
        if module.startswith("ffhq_ldm.data"):
            assert not {t for t in targets if t.startswith("ffhq_ldm.models")}, module


def test_pipelines_import_nothing_of_ffhq_ldm():
    for path in (ROOT / "pipelines").rglob("*.py"):
        assert not {m for m in imports_of(path) if m.split(".")[0] == "ffhq_ldm"}, path


def test_ffhq_ldm_never_imports_the_training_scripts():
    for path in (ROOT / "ffhq_ldm").rglob("*.py"):
        assert not {m for m in imports_of(path) if m.split(".")[0] == "training"}, path


def test_functions_are_short_and_the_training_scripts_read_top_to_bottom():
    """Every function of the library, the pipelines and the scripts within 80 lines; each
    training script within 200."""
    long = []
    for folder in ("ffhq_ldm", "pipelines", "training"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > 80:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {lines}")
    assert not long
    for script in (ROOT / "training").glob("train_*.py"):
        assert len(script.read_text().splitlines()) <= 200, script.name
