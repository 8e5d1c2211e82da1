"""Fixtures shared by test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

HF_ONLY_SPEC = Path(__file__).parent / "specs" / "mistral_hf_only.yaml"


@pytest.fixture
def hf_only_converters(tmp_path_factory, monkeypatch) -> Path:
    """MistralForCausalLM served by a spec with no vLLM layout table, compiled outside
    generated/ and named in SHARDSYNC_CONVERTERS (inherited by every process a test starts)."""
    from shardsync import generated
    from shardsync.compiler import build

    out = tmp_path_factory.mktemp("converters")
    build.write(build.outputs([HF_ONLY_SPEC], out, index=False))
    monkeypatch.setenv(generated.CONVERTERS_ENV, str(out))
    assert not generated.for_architecture("MistralForCausalLM").VLLM_LAYOUT
    return out
