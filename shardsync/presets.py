"""Model configs by preset name or path: tiny shapes for tests, real shapes for plans.

Presets are plain HF `config.json` files (no weights) shipped in `models/`.
"""

from __future__ import annotations

import json
from pathlib import Path

MODELS = Path(__file__).parent / "models"


def preset_names() -> list[str]:
    return sorted(path.stem for path in MODELS.glob("*.json"))


def model_config(name_or_path: str) -> dict:
    """An HF config dict from a preset name, a config.json, or a directory holding one."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        preset = MODELS / f"{name_or_path}.json"
        if not preset.is_file():
            raise FileNotFoundError(
                f"{name_or_path!r} is neither a config.json path nor a preset ({', '.join(preset_names())})"
            )
        path = preset
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
