"""Where a receiver writes: the live destination tensors of an engine rank.

Plain tensors take each piece in place. Engines whose parameters are not in the
loading format after loading (vLLM on CPU repacks linears for oneDNN) need more:
the vLLM targets in `runtime/integrations/vllm/params.py` restore a layer's loading-format
parameters before its first piece and re-run its post-processing after its last.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Protocol

import torch


class Targets(Protocol):
    """What a receiver writes an update into, by the plan's destination names.

    `begin_update` comes after the vote and before the first piece; `tensor(name)`
    gives the live tensor a piece is copied into (restoring a layer first where it
    must); `written(name, numel)` follows each piece; `finish_update` comes once
    every planned element was counted. `names`, `shape` and `dtype` are checked
    against the plan before the vote (`dtype` may answer None: not checked).
    """

    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype | None: ...

    def tensor(self, name: str) -> torch.Tensor: ...

    def written(self, name: str, numel: int) -> None: ...

    def begin_update(self) -> None: ...

    def finish_update(self) -> None: ...


class Loader(Protocol):
    """An engine's own loader of full HF tensors (vLLM models have one): the receiving
    end for a spec without a vLLM layout table. Each tensor is handed over as soon as
    its last bucket arrived, and released once the loader asks for the next."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]): ...


class TensorTargets:
    """Live tensors used as loaded: every piece is written straight into them."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors = tensors

    def names(self) -> set[str]:
        return set(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def tensor(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def written(self, name: str, numel: int) -> None:
        """Called after each piece; plain tensors need nothing more."""

    def begin_update(self) -> None:
        pass

    def finish_update(self) -> None:
        pass


def as_targets(params) -> Targets:
    """Accept a mapping of tensors or an object with the targets interface."""
    return params if hasattr(params, "written") else TensorTargets(params)


class HFTensors:
    """A loader over plain full HF tensors: each arriving tensor is copied into place.

    The stand-in for an engine's own loader where there is no engine (tests, tools);
    every tensor must arrive exactly once, with the shape it has here.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors = tensors

    def load_weights(self, weights) -> set[str]:
        loaded = set()
        for name, tensor in weights:
            if name not in self.tensors:
                raise KeyError(f"{name}: not a tensor of this engine")
            if name in loaded:
                raise ValueError(f"{name}: arrived twice in one update")
            self.tensors[name].copy_(tensor)
            loaded.add(name)
        return loaded


def as_loader(params) -> Loader:
    """Accept an engine loader (anything with `load_weights`) or a mapping of HF tensors."""
    return params if hasattr(params, "load_weights") else HFTensors(params)
