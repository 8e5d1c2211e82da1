"""The composed form of a family's layout in a spec: its parts and a placement per side.

A family the shorthands do not fit writes its parts (`shape:` for one tensor, `parts:`
for several) and a `layout:` from the vocabulary of `compiler/_kinds.py`:

    layout: replicate                          # every rank holds it whole
    layout: {shard: 1}                         # dimension 1 split over TP
    layout: {shard: 0, pad: 64}                # padded to a multiple first
    layout: stack                              # parts one after another, each split in units
    layout: {stack: {replicate_beyond: [k, v]}}
    layout: {interleave: kv_heads}             # per group, each part's units of the group
    layout: {megatron: ..., vllm: ...}         # a placement per side

A pad is a number or an integer config name, optionally `* tp`. Each placement becomes a
`_kinds` object here, so the compiler checks the composition it emits, and
`source` writes the object back as the Python the generated module holds.
"""

from __future__ import annotations

import dataclasses
import json
import re

from shardsync.compiler import _kinds

PLACEMENTS = ("replicate", "shard", "stack", "interleave")
SIDES = ("megatron", "vllm")
OWNERS = {"megatron": "Megatron", "vllm": "vLLM"}
_PAD = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*|[1-9][0-9]*)\s*(\*\s*tp)?\s*$")


class LayoutError(ValueError):
    """A placement a spec wrote wrongly; the message says what was expected."""


def placement(value, side: str, roles: tuple[str, ...], dims: int, int_names: set[str], alone: bool = False
              ) -> _kinds.Layout:
    """One side's placement from its spec value; `dims` is the rank of the family's tensors,
    `alone` that each part is a tensor of its own on this side."""
    if isinstance(value, str):
        name, argument = value, None
    elif isinstance(value, dict) and len(value) >= 1:
        name = next(iter(value))
        argument = value[name]
        extra = set(value) - {name, "pad"} if name == "shard" else set(value) - {name}
        if extra:
            raise LayoutError(f"unexpected {', '.join(sorted(extra))} beside {name}")
    else:
        raise LayoutError(f"expected one of {', '.join(PLACEMENTS)}, or a mapping of megatron and vllm placements")
    if name == "replicate":
        if argument is not None:
            raise LayoutError(f"replicate takes nothing, got {argument!r}")
        return _kinds.Replicate()
    if name == "stack":
        return _stack(argument, roles)
    if name == "shard":
        if type(argument) is not int or not 0 <= argument < dims:
            raise LayoutError(f"shard: expected a dimension 0..{dims - 1}, got {argument!r}")
        if len(roles) > 1 and not alone:
            raise LayoutError("shard places one part: stack or interleave several parts in one tensor, "
                              "or name a tensor per part")
        return _kinds.Shard(argument, _pad(value.get("pad"), side, int_names) if isinstance(value, dict) else None)
    if name == "interleave":
        if alone or len(roles) < 2:
            raise LayoutError("interleave places several parts in one tensor")
        if argument not in int_names:
            raise LayoutError(f"interleave: expected the integer config name of the group count, got {argument!r}")
        return _kinds.Interleave(argument)
    raise LayoutError(f"unknown placement {name!r}; expected one of: {', '.join(PLACEMENTS)}")


def _stack(argument, roles: tuple[str, ...]) -> _kinds.Stack:
    if argument is None:
        return _kinds.Stack()
    if not isinstance(argument, dict) or set(argument) != {"replicate_beyond"} or not isinstance(
            argument["replicate_beyond"], list):
        raise LayoutError("stack: expected nothing, or {replicate_beyond: [part, ...]}")
    unknown = [role for role in argument["replicate_beyond"] if role not in roles]
    if unknown:
        raise LayoutError(f"stack.replicate_beyond: {unknown[0]!r} is not a part (parts: {', '.join(roles)})")
    return _kinds.Stack(tuple(argument["replicate_beyond"]))


def _pad(value, side: str, int_names: set[str]) -> _kinds.Pad | None:
    if value is None:
        return None
    match = _PAD.match(str(value)) if not isinstance(value, bool) else None
    if match is None or (not match[1].isdigit() and match[1] not in int_names | {"make_vocab_size_divisible_by"}):
        raise LayoutError(f"pad: expected a number or an integer config name, optionally '* tp', got {value!r}")
    multiple = int(match[1]) if match[1].isdigit() else match[1]
    return _kinds.Pad(multiple, times_tp=bool(match[2]), owner=OWNERS[side])


def source(value) -> str:
    """A `_kinds` placement or part as the Python expression that builds it: fields left at
    their defaults are left out, strings in double quotes."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple):
        return "(" + ", ".join(source(item) for item in value) + ("," if len(value) == 1 else "") + ")"
    if dataclasses.is_dataclass(value):
        arguments = [f"{field.name}={source(getattr(value, field.name))}" for field in dataclasses.fields(value)
                     if getattr(value, field.name) != field.default]
        return f"{type(value).__name__}({', '.join(arguments)})"
    return repr(value)
