"""Converter modules compiled from specs/ by `shardsync compile --all`. Do not edit.

Each module converts one model family; `for_architecture` finds the one for an HF
`architectures` entry. Modules import only torch and their sibling `_kinds` (the
layout library, copied from compiler/_kinds.py), so a trainer can vendor this folder
without the rest of shardsync.

To try a spec without changing this package, compile it elsewhere
(`shardsync compile -o DIR my_model.yaml`) and name DIR in the environment variable
SHARDSYNC_CONVERTERS (several: separated by os.pathsep): modules there are found first,
by every process that inherits the variable (trainer ranks, engine workers).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import types
from pathlib import Path
from types import ModuleType

MODULES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mixtral",
    "Phi3ForCausalLM": "phi3",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Starcoder2ForCausalLM": "starcoder2",
}
CONVERTERS_ENV = "SHARDSYNC_CONVERTERS"


def for_architecture(architecture: str) -> ModuleType:
    """The converter module for an HF architecture name: one compiled into a directory of
    SHARDSYNC_CONVERTERS if any has it, else this package's."""
    for directory in filter(None, os.environ.get(CONVERTERS_ENV, "").split(os.pathsep)):
        for module in _compiled_in(Path(directory)):
            if architecture in module.ARCHITECTURES:
                return module
    if architecture not in MODULES:
        known = ", ".join(sorted(MODULES))
        raise KeyError(f"no spec for architecture {architecture!r} (specs exist for: {known}; "
                       f"{CONVERTERS_ENV} adds directories compiled with `shardsync compile -o DIR`)")
    return importlib.import_module(f"{__name__}.{MODULES[architecture]}")


def _compiled_in(directory: Path) -> list[ModuleType]:
    """The converter modules of a `shardsync compile -o` directory, imported as a package of
    their own (their `_kinds` is that directory's, not this package's)."""
    if not (directory / "_kinds.py").is_file():
        raise FileNotFoundError(f"{CONVERTERS_ENV}: {directory} holds no compiled converters (no _kinds.py)")
    package = "shardsync_converters_" + hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:12]
    if package not in sys.modules:
        module = types.ModuleType(package)
        module.__path__ = [str(directory)]
        sys.modules[package] = module
    names = sorted(path.stem for path in directory.glob("*.py") if not path.stem.startswith("_"))
    return [importlib.import_module(f"{package}.{name}") for name in names]
