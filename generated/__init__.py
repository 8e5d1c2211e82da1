"""Converter modules compiled from specs/ by `shardsync compile --all`. Do not edit.

Each module converts one model family; `for_architecture` finds the one for an HF
`architectures` entry. Modules import only torch and their sibling `_kinds` (the
layout library, copied from compiler/_kinds.py), so a trainer can vendor this folder
without the rest of shardsync.
"""

from __future__ import annotations

import importlib
from types import ModuleType

MODULES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


def for_architecture(architecture: str) -> ModuleType:
    """The converter module for an HF architecture name."""
    if architecture not in MODULES:
        known = ", ".join(sorted(MODULES))
        raise KeyError(f"no spec for architecture {architecture!r} (specs exist for: {known})")
    return importlib.import_module(f"{__name__}.{MODULES[architecture]}")
