import json

import pytest
import torch

from hydra_edge.config import get_preset
from hydra_edge.model import build_model

# a one-token WordLevel tokenizer: export only copies it into the bundle
TOKENIZER_JSON = json.dumps({
    "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
    "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
    "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "the": 1, "cat": 2}, "unk_token": "<unk>"},
})


def random_hydra(preset: str, seed: int = 0):
    """A Hydra with random weights and every gate half open, so that each path shows in the logits."""
    torch.manual_seed(seed)
    model = build_model(get_preset(preset)).eval()
    for block in model.blocks:
        torch.nn.init.zeros_(block.controller.bias)
    return model


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory):
    """hydra-tiny exported as float32 and as int8, with the model they came from."""
    from hydra_edge.export.bundle import ExportOptions, export_model

    model = random_hydra("hydra-tiny")
    root = tmp_path_factory.mktemp("bundles")
    float_result = export_model(model, TOKENIZER_JSON, root / "tiny-f32", ExportOptions(quantize="none"))
    int8_result = export_model(model, TOKENIZER_JSON, root / "tiny-int8", ExportOptions(quantize="int8"))
    return {"model": model, "none": float_result, "int8": int8_result}
