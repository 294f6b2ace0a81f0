"""Running exported bundles with numpy and onnxruntime; importing this package never imports torch."""

from .manifest import load_manifest
from .session import HydraSession

__all__ = ["HydraSession", "load_manifest"]
