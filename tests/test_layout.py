"""The layout's rules, checked on the source (docs/architecture.md says the same in words).

- no import circle;
- ``core/`` (``sft.core``, what a plugin sees) imports only ``core/``;
- the engine (``sft.engine``) imports no plugin and nothing of the front door;
- plugins import nothing of the front door, and no plugin kind imports another.

Every import counts: those inside functions (which keep heavy libraries out of ``sft --help``)
and those under ``if TYPE_CHECKING:`` (which name types for annotations), because either one
is a module that cannot be understood, or moved, without the other.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"sft": ROOT / "sft", "sft.core": ROOT / "core", "sft.engine": ROOT / "engine", "sft.plugins": ROOT / "plugins"}
#: Moved modules kept as aliases for one release: alias -> where it moved (its only import outside its room).
ALIASES = {"sft.core.testing": "sft.testing"}
FRONT_DOOR = "sft"
ROOMS = ("sft.core", "sft.engine", "sft.plugins")


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        paths = folder.glob("*.py") if package == FRONT_DOOR else folder.rglob("*.py")
        for path in paths:
            if "assets" in path.parts:
                continue  # data files of the engine (lm-eval's task module), never imported by sft
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    is_package = path.name == "__init__.py"
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]
        else:
            continue
        for candidate in names:
            while candidate and candidate not in modules:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _room(module: str) -> str:
    return next((room for room in ROOMS if module == room or module.startswith(room + ".")), FRONT_DOOR)


def _offenders(graph: dict[str, set[str]], rule) -> list[str]:
    return sorted(f"{m} -> {t}" for m, ts in graph.items() for t in ts if rule(m, t) and ALIASES.get(m) != t)


def test_no_module_imports_itself_through_others():
    graph = _graph()
    # A package importing its own submodules (re-exports) is not a circle.
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(edges):
        if module not in state and module not in ALIASES:
            visit(module)
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_the_core_imports_only_the_core():
    assert not _offenders(_graph(), lambda m, t: _room(m) == "sft.core" and _room(t) != "sft.core")


def test_the_engine_imports_no_plugin_and_nothing_of_the_front_door():
    assert not _offenders(_graph(), lambda m, t: _room(m) == "sft.engine" and _room(t) in ("sft.plugins", FRONT_DOOR))


def test_plugins_import_nothing_of_the_front_door_and_no_other_kind():
    def rule(m: str, t: str) -> bool:
        if _room(m) != "sft.plugins":
            return False
        other_kind = _room(t) == "sft.plugins" and t.count(".") >= 2 and t.split(".")[2] != m.split(".")[2]
        return _room(t) == FRONT_DOOR or other_kind
    assert not _offenders(_graph(), rule)


def test_the_rules_see_annotation_imports_and_find_a_planted_circle(tmp_path: Path):
    """The checker counts an import under TYPE_CHECKING (the circles issue 25 found hid there)."""
    planted = tmp_path / "mod.py"
    planted.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from sft.engine.run import x\n")
    modules = {**_modules(), "sft.core.planted": planted}
    assert "sft.engine.run" in _imports("sft.core.planted", planted, modules)


def test_the_core_is_small():
    lines = sum(len(p.read_text().splitlines()) for name, p in _modules().items()
                if _room(name) == "sft.core" and name not in ALIASES)
    assert lines <= 3000, f"core/ is {lines} lines; what a plugin does not need belongs in the engine or the front door"


def test_the_moved_test_kit_keeps_its_old_name_with_a_warning():
    code = ("import warnings; warnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    import sft.core.testing as old\n"
            "import sft.testing as new\n"
            "assert old.tiny_run is new.tiny_run and old.train_tiny is new.train_tiny\n"
            "print(w[0].message)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "sft.core.testing moved to sft.testing" in out


def test_no_module_of_any_room_imports_a_heavy_library_at_its_top():
    """Importing every module of the core, the engine, the plugins and the front door loads no
    torch, transformers, peft, trl, datasets, wandb or llama_cpp: those load inside the functions
    that use them, so ``sft --help``, ``sft plugins`` and config errors stay instant."""
    names = sorted(n for n in _modules() if n not in ALIASES)
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "heavy = ('torch', 'transformers', 'peft', 'trl', 'datasets', 'wandb', 'llama_cpp')\n"
            "print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "HEAVY []" in result.stdout, result.stdout


def test_the_engine_implements_the_export_context_the_core_declares(tmp_path: Path):
    """Exporters and publishers are written against :class:`sft.core.ExportContext`; the engine's
    context has every part of it."""
    from sft.engine.configuration import load_config
    from sft.core.interfaces import ExportContext
    from sft.core.plugins import get_plugin_manager
    from sft.core.templating import resolve_template
    from sft.engine.export import RunExportContext

    pm = get_plugin_manager()
    cfg = load_config(pm=pm)
    context = RunExportContext(tmp_path, cfg, pm, resolve_template(cfg, pm))
    declared = {n for n in vars(ExportContext) if not n.startswith("_")} | set(ExportContext.__annotations__)
    assert declared >= {"run_dir", "template", "tokenizer", "shared", "output_dir", "disk_problem"}
    assert not [n for n in sorted(declared) if not hasattr(type(context), n) and n not in vars(context)]
