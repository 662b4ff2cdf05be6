"""The direction of imports the layout promises: ris_core is the library, the app and the CLIs sit on top.

Parsed, not imported: every `import` statement counts, inside functions too (a lazy import is still a
dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module a file imports; `from pkg import sub` counts as `pkg.sub` when sub is a module."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            for alias in node.names:
                candidate = REPO.joinpath(*f"{node.module}.{alias.name}".split("."))
                if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
                    found.add(f"{node.module}.{alias.name}")
    return found


def files_under(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def top(name: str) -> str:
    return name.split(".", 1)[0]


@pytest.mark.parametrize("path", files_under("ris_core"), ids=lambda p: str(p.relative_to(REPO)))
def test_the_library_imports_no_app_cli_or_benchmark(path: Path):
    forbidden = {"streamlit", "ris_app", "pages", "training", "bench", "tests"}
    assert not {top(m) for m in imports_of(path)} & forbidden


@pytest.mark.parametrize("path", [*files_under("pages", "ris_app"), REPO / "dashboard.py"],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_the_app_never_imports_the_clis(path: Path):
    assert not {top(m) for m in imports_of(path)} & {"training", "bench", "tests"}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, str] = {}

    def visit(mod: str, trail: list[str]) -> list[str] | None:
        state[mod] = "open"
        for dep in sorted(graph.get(mod, ())):
            if state.get(dep) == "open":
                return [*trail[trail.index(dep):], dep]
            if dep not in state and (cycle := visit(dep, [*trail, dep])):
                return cycle
        state[mod] = "done"
        return None

    for mod in sorted(graph):
        if mod not in state and (cycle := visit(mod, [mod])):
            return cycle
    return None


def test_no_import_cycle_inside_the_library():
    graph = {module_name(p): {m for m in imports_of(p) if top(m) == "ris_core"} for p in files_under("ris_core")}
    # a submodule importing its own package's __init__ is how packages work, not a cycle of ours
    graph = {mod: {m for m in deps if m in graph and not mod.startswith(m + ".")} for mod, deps in graph.items()}
    assert len(graph) > 20  # the walk saw the library
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
