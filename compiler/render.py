"""Rendering validated specs into Python source with the jinja2 templates."""

from __future__ import annotations

import re
from pathlib import Path

import jinja2

from shardsync.compiler.spec import Spec

_TEMPLATES = Path(__file__).parent / "templates"
_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(_TEMPLATES)),
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
    undefined=jinja2.StrictUndefined,
    autoescape=False,
)


def render_module(spec: Spec) -> str:
    """The source of `generated/<family>.py` for one spec; same spec, same bytes."""
    return _tidy(_ENV.get_template("module.py.j2").render(spec=spec, qkv_checks=_qkv_checks(spec)))


def render_index(specs: list[Spec]) -> str:
    """The source of `generated/__init__.py`: architecture -> module."""
    return _tidy(_ENV.get_template("index.py.j2").render(specs=sorted(specs, key=lambda s: s.family)))


def _qkv_checks(spec: Spec) -> list[tuple[str, str]]:
    """(heads, kv_heads) pairs whose divisibility the qkv layout relies on."""
    pairs: list[tuple[str, str]] = []
    for param in spec.params:
        if param.kind.name == "qkv":
            dims = dict(param.dims)
            pair = (dims["heads"], dims["kv_heads"])
            if pair not in pairs:
                pairs.append(pair)
    return pairs


def _tidy(source: str) -> str:
    """No trailing blanks, at most two blank lines in a row, one final newline."""
    lines = [line.rstrip() for line in source.splitlines()]
    text = re.sub(r"\n{4,}", "\n\n\n", "\n".join(lines))
    return text.strip("\n") + "\n"
