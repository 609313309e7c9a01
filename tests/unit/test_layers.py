"""Dependencies run one way: cli -> report -> ops / health / devices -> image -> transforms / store / format /
disk -> errors, units, defaults.  Nothing imports cli.

Two checks: every module is imported in a fresh interpreter and the diskimg modules that import
pulls in are compared with what its layer may use (what really loads); and every import statement
in the source, including those inside functions (the CLI and the library import lazily), is
checked against the same table (what could load later).
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "diskimg"

# Each unit (a subpackage, or a top-level module) and the units it may import besides itself.
BASE = {"diskimg", "errors", "units", "defaults", "ranges", "atomicfile"}
LOW = BASE | {"format", "transforms", "store", "disk", "crypto"}
ALLOWED: dict[str, set[str]] = {
    "diskimg": BASE,          # the package itself: its public API is re-exported lazily
    "errors": set(),
    "units": set(),
    "defaults": set(),
    "ranges": set(),
    "atomicfile": set(),
    "transforms": BASE,
    "store": BASE,
    "disk": BASE,
    "format": BASE | {"transforms"},
    "crypto": BASE | {"format", "transforms"},
    "image": LOW,
    "devices": BASE | {"disk"},
    "health": BASE,
    "ops": LOW | {"image", "devices", "health"},
    "report": LOW | {"image", "health"},
    "backup": LOW | {"image", "ops", "devices", "health"},
    "cli": LOW | {"image", "ops", "devices", "health", "report", "backup"},
    "__main__": {"cli"},
}
# What the package's lazy re-exports may reach (diskimg/__init__.py's __getattr__).
LAZY_ROOT = {"ops", "image", "devices", "health"}


def _unit(module: str) -> str:
    """'diskimg.ops.restore' -> 'ops'; 'diskimg.errors' -> 'errors'; 'diskimg' -> 'diskimg'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "diskimg"


def _modules() -> list[str]:
    mods = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods.append(".".join(parts))
    return mods


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported diskimg module) for every import statement in the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("diskimg")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if not base.startswith("diskimg"):
                continue
            for a in node.names:   # `from diskimg import ops` imports the subpackage ops
                sub = f"{base}.{a.name}"
                out.append((node.lineno, sub if _is_module(sub) else base))
    return out


def _is_module(name: str) -> bool:
    p = REPO.joinpath(*name.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def test_every_unit_is_in_the_layer_table():
    units = {_unit(m) for m in _modules()}
    assert units <= set(ALLOWED), f"add {sorted(units - set(ALLOWED))} to ALLOWED"


@pytest.mark.parametrize("module", _modules())
def test_imports_in_the_source_point_down(module):
    path = REPO.joinpath(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    me = _unit(module)
    allowed = ALLOWED[me] | {me} | (LAZY_ROOT if module == "diskimg" else set())
    wrong = [f"line {line}: {name}" for line, name in _imports(path, module)
             if _unit(name) not in allowed]
    assert not wrong, f"{module} ({me}) imports upward or sideways: {wrong}"


def test_modules_load_only_their_layers():
    """Each module in a fresh interpreter: what it really loads."""
    script = (
        "import importlib, json, sys\n"
        "name = sys.argv[1]\n"
        "before = set(sys.modules)\n"
        "importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('diskimg') "
        "and m not in before)))\n")
    failures = []
    for module in _modules():
        if module == "diskimg.__main__":
            continue    # running it is the CLI; its imports are checked in the source above
        proc = subprocess.run([sys.executable, "-c", script, module], capture_output=True,
                              text=True, cwd=REPO)
        assert proc.returncode == 0, f"{module}: {proc.stderr[-2000:]}"
        me = _unit(module)
        # importing any submodule runs the package first, which loads errors (its API)
        allowed = ALLOWED[me] | {me, "diskimg", "errors"}
        loaded = json.loads(proc.stdout.splitlines()[-1])
        wrong = [m for m in loaded if _unit(m) not in allowed]
        if wrong:
            failures.append(f"{module} ({me}) loads {wrong}")
    assert not failures, "\n".join(failures)


def test_nothing_imports_cli():
    users = [f"{m}: line {line}" for m in _modules() if _unit(m) not in ("cli", "__main__")
             for line, name in _imports(
                 (lambda p: p / "__init__.py" if p.is_dir() else p.with_suffix(".py"))(
                     REPO.joinpath(*m.split("."))), m)
             if _unit(name) == "cli"]
    assert not users
