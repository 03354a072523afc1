"""flashep: expert-parallel MoE communication, a drop-in replacement for DeepEP V1.

    import flashep as deep_ep
    buffer = deep_ep.Buffer(group, num_nvl_bytes=...)

Exports Buffer, Config, EventOverlap and topk_idx_t (= torch.int64), as deep_ep does, plus the
errors: FlashepError (a RuntimeError) and one subclass per runtime kind (FlashepTimeoutError,
FlashepPeerMismatchError, FlashepPeerFailedError, FlashepDeviceFaultError, FlashepPoisonedError,
FlashepUnsupportedError, also a NotImplementedError). Invalid arguments raise ValueError/TypeError.

`flashep._C` (the C++ core and CPU oracle), `flashep.Config` and `flashep.env` work without torch;
Buffer, EventOverlap and topk_idx_t import torch on first access.
"""
import importlib as _importlib

from . import _C
from ._C import (
    Config,
    FlashepDeviceFaultError,
    FlashepError,
    FlashepPeerFailedError,
    FlashepPeerMismatchError,
    FlashepPoisonedError,
    FlashepTimeoutError,
    FlashepUnsupportedError,
)

__version__ = "0.1.0"
__all__ = ["Buffer", "Config", "EventOverlap", "FlashepError", "FlashepTimeoutError", "FlashepPeerMismatchError",
           "FlashepPeerFailedError", "FlashepDeviceFaultError", "FlashepPoisonedError", "FlashepUnsupportedError",
           "topk_idx_t"]

# name -> submodule that defines it; these need torch, so they load on first access (PEP 562).
_TORCH_EXPORTS = {"Buffer": "buffer", "EventOverlap": "utils", "topk_idx_t": "utils"}


def __getattr__(name: str) -> object:
    module = _TORCH_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))
