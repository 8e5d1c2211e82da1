"""The split kinds a spec may name, and what each needs from the spec.

A kind is a sharding layout shared by Megatron and vLLM (vLLM has one weight loader
per layer kind; here each kind has one class in `compiler/_kinds.py`, the layout
library copied into generated/). Adding a kind means an entry here and a class there.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    name: str
    class_name: str
    required_dims: tuple[str, ...]
    optional_dims: tuple[str, ...] = ()
    hf_roles: tuple[str, ...] | None = None  # None: one HF tensor, named by a string
    doc: str = ""


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind(
            "replicated",
            "Replicated",
            ("size",),
            doc="every TP rank holds the whole tensor (norms, biases added after a reduce)",
        ),
        Kind(
            "row",
            "RowParallel",
            ("rows", "cols"),
            doc="row-parallel linear: TP rank r holds column block r",
        ),
        Kind(
            "gated",
            "MergedColumnParallel",
            ("rows",),
            ("cols",),
            hf_roles=("gate", "up"),
            doc="gated MLP input: TP rank r holds [gate rows of r; up rows of r]",
        ),
        Kind(
            "qkv",
            "QKVParallel",
            ("heads", "kv_heads", "head_dim"),
            ("cols",),
            hf_roles=("q", "k", "v"),
            doc="attention input: rows interleaved per query group in Megatron, [q|k|v] in vLLM",
        ),
        Kind(
            "vocab",
            "VocabParallel",
            ("rows", "cols"),
            doc="vocab-parallel rows, padded at the end (differently by Megatron and vLLM)",
        ),
    )
}
