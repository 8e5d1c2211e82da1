"""The shorthand split kinds a spec may name, and what each needs from the spec.

Each shorthand is a composition of the layout vocabulary (`compiler/_kinds.py`, copied
into generated/), built there by the function of the same name; a family the shorthands
do not fit says its parts and layouts itself (`compiler/layouts.py`). Adding a shorthand
means an entry here and a function there.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    name: str
    required_dims: tuple[str, ...]
    optional_dims: tuple[str, ...] = ()
    hf_roles: tuple[str, ...] | None = None  # None: one HF tensor, named by a string
    doc: str = ""


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("replicated", ("size",), doc="every TP rank holds the whole 1-D tensor (norms, biases added after a reduce)"),
        Kind("row", ("rows", "cols"), doc="row-parallel linear: TP rank r holds column block r"),
        Kind("column", ("rows",), ("cols",), doc="column-parallel linear (or its bias): TP rank r holds row block r"),
        Kind("gated", ("rows",), ("cols",), hf_roles=("gate", "up"),
             doc="gated MLP input: TP rank r holds [gate rows of r; up rows of r]"),
        Kind("qkv", ("heads", "kv_heads", "head_dim"), ("cols",), hf_roles=("q", "k", "v"),
             doc="attention input: rows interleaved per query group in Megatron, [q|k|v] in vLLM"),
        Kind("vocab", ("rows", "cols"), doc="vocab-parallel rows, padded at the end (differently by Megatron and vLLM)"),
    )
}
