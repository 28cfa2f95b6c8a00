"""Imports point down the layers, at the top of each module; an effx import inside a function is a declared
front door. pyproject.toml's ``[tool.effx.front-doors]`` lists each such import ("importer -> imported") with
its kind and reason; import-linter's layers contract (``make lint``) checks the direction of every import,
these tests that the table is complete and true."""

from __future__ import annotations

import ast
import sys
import tomllib
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "effx"
KINDS = ("upward", "torch-free", "start-up", "optional dependency", "cycle")


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _front_doors() -> dict[str, str]:
    return _config()["tool"]["effx"]["front-doors"]


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The effx modules ``node`` imports: ``from effx import show`` imports effx.show, ``from .forward import
    KVCache`` effx.runtime.forward."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "effx"]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        name = ".".join([*base, node.module] if node.module else base)
    else:
        name = node.module or ""
    if name.split(".")[0] != "effx":
        return []
    return sorted({f"{name}.{a.name}" if _is_module(f"{name}.{a.name}") else name for a in node.names})


def _is_type_checking(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``): its body never runs."""
    return isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def _walk(node: ast.AST, in_function: bool, path: Path, found: dict[str, list[str]]) -> None:
    module, is_package = _module(path), path.name == "__init__.py"
    for child in ast.iter_child_nodes(node):
        if _is_type_checking(child):
            for other in child.orelse:
                _walk(other, in_function, path, found)
            continue
        if in_function and isinstance(child, ast.Import | ast.ImportFrom):
            for target in _targets(child, module, is_package):
                found[f"{module} -> {target}"].append(f"{path.relative_to(ROOT)}:{child.lineno}")
        _walk(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef), path, found)


def function_imports() -> dict[str, list[str]]:
    """Every effx import inside a function body in effx/: "importer -> imported" -> its places (file:line).
    Imports under ``if TYPE_CHECKING:`` are not run, and are left out."""
    found: dict[str, list[str]] = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        _walk(ast.parse(path.read_text(), filename=str(path)), False, path, found)
    return dict(found)


def test_every_import_inside_a_function_is_a_declared_front_door():
    declared = _front_doors()
    undeclared = [
        f"{place}: {pair}"
        for pair, places in function_imports().items()
        if pair not in declared
        for place in places
    ]
    assert not undeclared, (
        "effx imports inside functions that pyproject.toml's [tool.effx.front-doors] does not declare: move "
        "each to its module's top, or declare it there with its kind and reason:\n" + "\n".join(undeclared)
    )


def test_every_declared_front_door_is_used():
    unused = sorted(set(_front_doors()) - set(function_imports()))
    assert not unused, f"[tool.effx.front-doors] declares imports that no function makes any more: {unused}"


def test_every_front_door_says_why():
    bad = {
        pair: reason
        for pair, reason in _front_doors().items()
        if reason.split(":")[0] not in KINDS or not reason.split(":", 1)[-1].strip()
    }
    assert not bad, f"a front door's reason is 'kind: why', kind one of {KINDS}: {bad}"


def test_upward_front_doors_are_the_layers_contract_exceptions():
    """An import up the layers is an "upward" front door and one of import-linter's ignore_imports, and back."""
    contracts = _config()["tool"]["importlinter"]["contracts"]
    ignored = {i for c in contracts if c["type"] == "layers" for i in c.get("ignore_imports", [])}
    upward = {pair for pair, reason in _front_doors().items() if reason.startswith("upward:")}
    assert upward == ignored, (
        f"upward front doors not in ignore_imports: {sorted(upward - ignored)}; "
        f"ignore_imports not declared upward front doors: {sorted(ignored - upward)}"
    )


def test_function_imports_finds_what_it_should():
    """The walk itself: a relative import in a method, and ``from .. import <module>`` read as that module."""
    found = function_imports()
    assert found["effx.program -> effx.runtime.generate"][0].startswith("effx/program.py:")
    assert found["effx.passes.lower -> effx.kernels"][0].startswith("effx/passes/lower.py:")


def test_type_checking_blocks_are_left_out_and_nothing_else(tmp_path, monkeypatch):
    module = tmp_path / "effx" / "m.py"
    module.parent.mkdir()
    (module.parent / "n.py").write_text("")
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "def f():\n"
        "    if TYPE_CHECKING:\n"
        "        from .n import A\n"
        "    if TYPE_CHECKING or True:\n"
        "        from . import n\n"
        "    else:\n"
        "        import effx.n\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "effx")
    assert function_imports() == {"effx.m -> effx.n": ["effx/m.py:6", "effx/m.py:8"]}
