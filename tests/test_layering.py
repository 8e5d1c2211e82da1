"""The layers import one way: spec -> compiler -> generated -> plan -> wire -> methods
-> transfer -> integrations, and the library never imports the tools built on it.

Read from the source (every import statement, also those inside functions), so a
lazy import cannot hide a reach back up the chain.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"shardsync.runtime": ROOT / "runtime", "shardsync.generated": ROOT / "generated",
           "shardsync.compiler": ROOT / "compiler", "shardsync": ROOT / "shardsync"}

# which parts of the runtime each layer may import (besides torch and the standard library)
RUNTIME_LAYERS = {
    "plan": {"plan", "errors"},
    "session": {"session", "errors"},
    "wire": {"plan", "wire", "errors", "targets", "device_wait"},
    "methods": {"plan", "wire", "session", "methods", "errors", "targets", "reports", "tensor_checks"},
}
# imported by every layer: import no layer
TOP_OF_RUNTIME = {"errors", "targets", "reports", "tensor_checks", "nonfinite", "device_wait"}


def _modules(package: str) -> dict[str, Path]:
    folder = FOLDERS[package]
    found = {}
    for path in folder.rglob("*.py"):
        parts = path.relative_to(folder).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if package == "shardsync" and parts and parts[0] in ("models",):
            continue
        found[".".join((package,) + parts)] = path
    return found


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of everything a module imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _runtime_part(imported: str) -> str | None:
    if imported == "shardsync.runtime" or not imported.startswith("shardsync.runtime."):
        return None
    return imported.split(".")[2]


RUNTIME = _modules("shardsync.runtime")


@pytest.mark.parametrize("name", sorted(RUNTIME))
def test_runtime_modules_import_only_down_the_chain(name):
    imports = _imports(name, RUNTIME[name])
    beyond = sorted(i for i in imports if i.startswith("shardsync.") and not (
        i.startswith("shardsync.runtime") or i.startswith("shardsync.generated")))
    assert not beyond, f"{name} imports {beyond}: the runtime must not depend on the compiler or the tools"
    part = name.split(".")[2] if name.count(".") >= 2 else None
    used = {p for p in map(_runtime_part, imports) if p is not None}
    if part in RUNTIME_LAYERS:
        assert used <= RUNTIME_LAYERS[part], f"{name} ({part}/) imports {sorted(used - RUNTIME_LAYERS[part])}"
    if part in TOP_OF_RUNTIME:
        assert used <= TOP_OF_RUNTIME, f"{name} imports {sorted(used - TOP_OF_RUNTIME)}"
    if part == "plan":
        assert not {i for i in imports if i.split(".")[0] == "torch"}, f"{name}: the planner is pure Python"


@pytest.mark.parametrize("name", sorted(_modules("shardsync.generated")))
def test_generated_modules_import_only_torch_the_standard_library_and_their_siblings(name):
    path = _modules("shardsync.generated")[name]
    outside = sorted(i for i in _imports(name, path) if i.split(".")[0] not in sys.stdlib_module_names | {"torch"}
                     and not i.startswith("shardsync.generated"))
    assert not outside, f"{name} imports {outside}"


def test_nothing_under_the_runtime_or_generated_imports_the_compiler():
    for package in ("shardsync.runtime", "shardsync.generated"):
        for name, path in _modules(package).items():
            assert not any(i.startswith("shardsync.compiler") for i in _imports(name, path)), name


def test_library_commands_import_no_other_commands_private_helpers():
    """A helper two commands share lives in the harness under a public name."""
    for name, path in _modules("shardsync").items():
        for imported in _imports(name, path):
            module, _, attr = imported.rpartition(".")
            if attr.startswith("_") and not attr.startswith("__") and module.startswith("shardsync") \
                    and module != name.rpartition(".")[0]:
                pytest.fail(f"{name} imports the private {imported}")


def test_no_import_cycles():
    """Lazy imports included: a cycle is a design knot even where Python tolerates it."""
    modules = {}
    for package in FOLDERS:
        modules.update(_modules(package))
    edges = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(name, path):
            if imported in modules:
                targets.add(imported)
        # `from package import submodule` depends on the submodule, not on the package's __init__
        for imported in list(targets):
            if any(other.startswith(imported + ".") and other in targets for other in targets):
                targets.discard(imported)
        edges[name] = {t for t in targets if t != name and not name.startswith(t + ".")}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
