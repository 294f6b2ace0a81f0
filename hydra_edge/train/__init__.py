"""Training: the logic and text tasks, the training loop and checkpoints.

``TrainConfig`` (in ``options``) imports no torch, so the CLI can read its
defaults where torch is missing; the other names load torch on first use.
"""

from importlib import import_module

from .options import TrainConfig

_LAZY = {
    "TrainResult": ".loop",
    "train": ".loop",
    "load_checkpoint": ".checkpoint",
    "save_checkpoint": ".checkpoint",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TrainConfig", "TrainResult", "load_checkpoint", "save_checkpoint", "train"]
