"""Compiling spec files into a package directory, or checking one is current."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shardsync.compiler.errors import SpecError
from shardsync.compiler.render import render_index, render_kinds, render_module
from shardsync.compiler.spec import Spec, load_spec

INDEX = "__init__.py"
KINDS = "_kinds.py"  # the layout library every module imports, the same for all


@dataclass(frozen=True)
class Output:
    path: Path
    source: str

    def is_current(self) -> bool:
        return self.path.is_file() and self.path.read_text() == self.source


def outputs(spec_paths: list[Path], out_dir: Path, index: bool) -> list[Output]:
    """What compiling these specs writes: their modules and the layout library they import;
    the package index only for a full build."""
    specs = [load_spec(path) for path in spec_paths]
    _refuse_clashes(specs)
    result = [Output(out_dir / KINDS, render_kinds())]
    result += [Output(out_dir / f"{spec.family}.py", render_module(spec)) for spec in specs]
    if index:
        result.append(Output(out_dir / INDEX, render_index(specs)))
    return result


def stale_modules(spec_paths: list[Path], out_dir: Path) -> list[Path]:
    """Modules in `out_dir` that no spec produces any more."""
    families = {load_spec(path).family for path in spec_paths}
    return sorted(p for p in out_dir.glob("*.py") if p.name not in (INDEX, KINDS) and p.stem not in families)


def write(outs: list[Output]) -> list[Path]:
    """Write what changed; returns the paths written."""
    written = []
    for out in outs:
        if not out.is_current():
            out.path.parent.mkdir(parents=True, exist_ok=True)
            out.path.write_text(out.source)
            written.append(out.path)
    return written


def _refuse_clashes(specs: list[Spec]) -> None:
    seen: dict[str, str] = {}
    for spec in specs:
        for key in [f"family {spec.family}"] + [f"architecture {a}" for a in spec.architectures]:
            if key in seen:
                raise SpecError(spec.source_name, None, "", f"{key} is also defined by {seen[key]}")
            seen[key] = spec.source_name
