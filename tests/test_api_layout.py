"""The plugin contract in one place (``megatron.api``), the names the contract pages use importable, the moved
modules still importable with a warning, and the package layering: no import cycles, imports at module top."""
from __future__ import annotations

import ast
import importlib
import re
import warnings
from pathlib import Path

import pytest

import megatron
import megatron.api

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "registry_docs"
PACKAGE = ROOT / "megatron"

# `from megatron[.x] import a, b` in a Python code block (one line or a parenthesised list)
IMPORT = re.compile(r"^\s*from (megatron(?:\.\w+)*) import \(?([\w, \n]+?)\)?\s*$", re.M)


def _doc_imports() -> list[tuple[str, str, str]]:
    found = []
    for page in sorted(DOCS.rglob("*.md")):
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S):
            for module, names in IMPORT.findall(block):
                for name in (n.strip() for n in names.replace("\n", " ").split(",")):
                    if name:
                        found.append((page.relative_to(ROOT).as_posix(), module, name))
    return found


def test_the_contract_pages_import_only_names_that_exist():
    imports = _doc_imports()
    assert len(imports) > 20, "the pages' code blocks were not found"
    missing = []
    for page, module, name in imports:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)  # the pages must use the current paths
            try:
                mod = importlib.import_module(module)
            except (ImportError, DeprecationWarning) as exc:
                missing.append(f"{page}: {module} ({exc})")
                continue
        if not hasattr(mod, name) and not importlib.util.find_spec(f"{module}.{name}"):
            missing.append(f"{page}: {module}.{name}")
    assert missing == []


def test_every_api_name_is_importable_from_the_package_root_too():
    for name in megatron.api.__all__:
        assert getattr(megatron, name) is getattr(megatron.api, name), name
    assert set(megatron.api.__all__) == set(megatron._API_NAMES)


def test_the_five_interfaces_live_in_megatron_api():
    from megatron.pluginmanager import KINDS

    for kind, (_, base) in KINDS.items():
        assert base.__module__.startswith("megatron.api."), (kind, base.__module__)


@pytest.mark.parametrize("old", sorted(megatron.MOVED_MODULES))
def test_a_moved_module_still_imports_and_warns_with_its_new_path(old):
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=re.escape(megatron.MOVED_MODULES[old])):
        module = importlib.import_module(old)
    assert module is importlib.import_module(megatron.MOVED_MODULES[old])
    assert module.__name__ == megatron.MOVED_MODULES[old]  # the real module, not a copy


def test_the_similarity_contract_names_still_reach_third_party_metrics_through_the_old_package():
    import megatron.similarity

    with pytest.warns(DeprecationWarning, match="megatron.api"):
        assert megatron.similarity.SimilarityMetric is megatron.api.SimilarityMetric


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _megatron_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imported(node: ast.AST, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        candidates = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    elif isinstance(node, ast.Import):
        candidates = [a.name for a in node.names]
    else:
        return []
    return [c for c in candidates if c in modules]


def test_the_package_has_no_import_cycles_at_module_level():
    modules = _megatron_modules()
    graph = {m: {t for node in ast.parse(p.read_text()).body for t in _imported(node, modules)} - {m}
             for m, p in modules.items()}

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for m in sorted(graph) if (c := cycle_from(m))]
    assert cycles == []


def test_imports_inside_functions_are_only_where_start_up_time_or_an_optional_dependency_needs_them():
    """The CLI's command modules import lazily on purpose (``megatron/commands/__init__.py``); elsewhere an
    import of a megatron module inside a function carries a comment saying why."""
    modules = _megatron_modules()
    unexplained = []
    for name, path in modules.items():
        source = path.read_text()
        if "# lazy imports: start-up time" in source:
            continue
        lines = source.splitlines()
        for func in ast.walk(ast.parse(source)):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if _imported(node, modules) and "#" not in lines[node.lineno - 1] \
                        and "#" not in lines[node.lineno - 2]:
                    unexplained.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert unexplained == []


def test_runtime_infrastructure_sits_beneath_the_packages_that_use_it():
    modules = _megatron_modules()
    for name, path in modules.items():
        if not name.startswith("megatron.runtime"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            for target in _imported(node, modules):
                assert not target.startswith(("megatron.training", "megatron.data", "megatron.evaluation",
                                              "megatron.similarity", "megatron.benchmark")), (name, target)
