"""The package's imports run one way: each module imports only from its own layer or the layers below.

The layers, bottom to top, are LAYERS below; ARCHITECTURE.md draws the same picture.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import sftlab

PACKAGE = Path(sftlab.__file__).parent

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("sftlab.core",)),
    ("base", ("sftlab.config", "sftlab.models", "sftlab.gguf_cache", "sftlab.special_tokens", "sftlab.qlora")),
    ("data", ("sftlab.data", "sftlab.demo_data", "sftlab.rundir")),
    ("plan", ("sftlab.plan",)),
    ("eval", ("sftlab.eval",)),
    ("train", ("sftlab.train",)),
    ("apps", ("sftlab.diagnose", "sftlab.diagnose_rules", "sftlab.diagnose_progress", "sftlab.report", "sftlab.report_plots", "sftlab.export", "sftlab.export_gguf", "sftlab.chat", "sftlab.chat_tools")),
    ("entry", ("sftlab.cli", "sftlab.demo", "sftlab.__main__")),
]
# Only the entry layer (and the package's lazy public API) import sftlab modules inside functions:
# `sftlab --help` and `import sftlab` stay fast.
DEFERRED_COMMENT = "# deferred"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int | None:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def _imports(path: Path):
    """(imported module, line, inside a function) for every sftlab import of ``path``."""
    yield from _imports_of(path.read_text(encoding="utf-8"), _module_name(path), path.name == "__init__.py")


def _imports_of(source: str, me: str, is_package: bool):
    tree = ast.parse(source)
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = me.split(".")[: len(me.split(".")) - node.level + is_package]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            targets = [name] if node.module or not node.level else [f"{name}.{a.name}" for a in node.names]
            if name == "sftlab":  # `from sftlab import rundir`
                targets = [f"sftlab.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if t == "sftlab" or t.startswith("sftlab."):
                yield t, node.lineno, id(node) in in_function


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    missing = [_module_name(p) for p in _modules() if _module_name(p) != "sftlab" and _layer(_module_name(p)) is None]
    assert not missing, f"modules with no layer (add them to LAYERS and ARCHITECTURE.md): {missing}"


def test_no_module_imports_from_a_layer_above_it():
    upward = []
    for path in _modules():
        me = _module_name(path)
        mine = _layer(me)
        if mine is None:
            continue
        for target, line, _ in _imports(path):
            theirs = _layer(target)
            if theirs is not None and theirs > mine:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {me} ({LAYERS[mine][0]}) imports "
                              f"{target} ({LAYERS[theirs][0]})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_sftlab_imports_sit_at_module_top():
    """In-function imports hide cycles; only the lazy entry points defer sftlab modules."""
    deferred = [f"{path.relative_to(PACKAGE.parent)}:{line}: {target}"
                for path in _modules() if _layer(_module_name(path)) != len(LAYERS) - 1 and _module_name(path) != "sftlab"
                for target, line, inside in _imports(path) if inside]
    assert not deferred, "sftlab imports inside functions:\n" + "\n".join(deferred)


def test_deferred_imports_say_why():
    """A third-party or lazy import inside a function carries a comment saying it is deferred on purpose."""
    bare = []
    for path in _modules():
        lines = path.read_text(encoding="utf-8").splitlines()
        tree = ast.parse("\n".join(lines))
        for f in ast.walk(tree):
            if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(f):
                if not isinstance(node, (ast.Import, ast.ImportFrom)) or getattr(node, "level", 0):
                    continue
                top = (node.module if isinstance(node, ast.ImportFrom) else node.names[0].name).split(".")[0]
                if top in sys.stdlib_module_names and top != "sftlab":
                    continue
                text = " ".join(lines[node.lineno - 2: node.end_lineno])
                if DEFERRED_COMMENT not in text and "# pragma" not in text:
                    bare.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not bare, "deferred imports without a comment:\n" + "\n".join(bare)


def test_files_stay_small():
    big = [f"{p.relative_to(PACKAGE.parent)}: {n} lines" for p in _modules()
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500]
    assert not big, big


def test_train_functions_stay_short():
    long = []
    for path in sorted((PACKAGE / "train").rglob("*.py")):
        for f in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.end_lineno - f.lineno + 1 > 60:
                long.append(f"{path.name}:{f.lineno} {f.name}: {f.end_lineno - f.lineno + 1} lines")
    assert not long, long


def test_the_walker_sees_upward_and_deferred_imports():
    """The checks above can fail: a core module importing train, at top and inside a function, is seen."""
    src = "from sftlab.train.run import train\n\n\ndef f():\n    from ..eval import run\n"
    found = list(_imports_of(src, "sftlab.core.probe", False))
    assert found == [("sftlab.train.run", 1, False), ("sftlab.eval", 5, True)]
    assert [_layer(t) for t, _, _ in found] == [5, 4] and _layer("sftlab.core.probe") == 0


def _architecture_layers_block() -> str:
    text = (PACKAGE.parent.parent / "ARCHITECTURE.md").read_text(encoding="utf-8")
    return text.split("## Layers", 1)[1].split("```")[1]


def test_architecture_names_every_module_and_no_other():
    """ARCHITECTURE.md's layer picture names each module (by its name; data/'s chain without `.py`), and
    every `name.py` it names exists: a new module, or a removed one, shows up here."""
    import re

    block = _architecture_layers_block()
    stems = {p.stem for p in _modules() if p.stem not in ("__init__",)}
    unnamed = sorted(str(p.relative_to(PACKAGE)) for p in _modules()
                     if p.stem != "__init__" and not re.search(rf"(?<![\w/]){re.escape(p.stem)}(\.py)?\b", block))
    assert not unnamed, f"modules ARCHITECTURE.md's layers do not name: {unnamed}"
    stale = sorted(n for n in set(re.findall(r"\b(\w+)\.py\b", block)) if n not in stems)
    assert not stale, f"ARCHITECTURE.md's layers name modules that do not exist: {stale}"
