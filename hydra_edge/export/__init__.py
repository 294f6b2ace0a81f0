"""Export of a checkpoint to an onnxruntime bundle (``hydra-edge export``)."""
