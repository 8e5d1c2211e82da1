"""Rendering validated specs into Python source with the jinja2 templates."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import jinja2

from shardsync.compiler import _kinds
from shardsync.compiler.layouts import source
from shardsync.compiler.spec import Param, Spec

_TEMPLATES = Path(__file__).parent / "templates"
_KINDS = Path(__file__).parent / "_kinds.py"
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
    template = _ENV.get_template("module.py.j2")
    return _tidy(template.render(spec=spec, group_checks=_group_checks(spec), config_arguments=_config_arguments(spec),
                                 all_families=_wrapped([param.const_name for param in spec.params]),
                                 source=source, vllm_source=_vllm_source))


def render_kinds() -> str:
    """The source of `generated/_kinds.py`: the layout library, copied verbatim."""
    return _KINDS.read_text()


def render_index(specs: list[Spec]) -> str:
    """The source of `generated/__init__.py`: architecture -> module."""
    return _tidy(_ENV.get_template("index.py.j2").render(specs=sorted(specs, key=lambda s: s.family)))


def _group_checks(spec: Spec) -> list[tuple[str, str]]:
    """(count, groups) pairs whose divisibility an interleaved layout relies on: each part's
    units split evenly over the groups (query heads over KV heads)."""
    pairs: list[tuple[str, str]] = []
    for param in spec.params:
        for layout in (param.family.megatron_layout, param.family.vllm_layout):
            if isinstance(layout, _kinds.Interleave):
                for part in param.family.parts:
                    pair = (part.count, layout.groups)
                    if part.count != layout.groups and pair not in pairs:
                        pairs.append(pair)
    return pairs


def _vllm_source(param: Param) -> str:
    """A family's vLLM name as the module writes it: one name, a name per part, or None."""
    if param.vllm is None:
        return "None"
    return source(param.vllm[0]) if len(param.vllm) == 1 else source(param.vllm)


def _config_arguments(spec: Spec) -> list[str]:
    """`name=name, ...` for every Config field, wrapped to fit the line length."""
    names = [e.name for e in spec.config] + [d.name for d in spec.derived] + ["make_vocab_size_divisible_by"]
    return _wrapped([f"{name}={name}" for name in names])


def _wrapped(items: list[str]) -> list[str]:
    """Items of a call or tuple, comma-separated, in lines that fit indented."""
    return textwrap.wrap(", ".join(items) + ",", width=110, break_long_words=False, break_on_hyphens=False)


def _tidy(source: str) -> str:
    """No trailing blanks, at most two blank lines in a row, one final newline."""
    lines = [line.rstrip() for line in source.splitlines()]
    text = re.sub(r"\n{4,}", "\n\n\n", "\n".join(lines))
    return text.strip("\n") + "\n"
