import json

import pytest
import torch

from hydra_edge.config import get_preset

# the tests' models are small: one torch thread is faster than two fighting over a busy machine
torch.set_num_threads(1)
from hydra_edge.model import build_model

SAMPLE_TEXT = (
    "The river rises in the hills and runs north to the sea. "
    "In 1907 a bridge was built where the old ford had been, and the town grew around it.\n"
    "Ships brought coal and grain; the mills along the banks turned them into flour and steel.\n"
) * 40


def _bpe_tokenizer_json() -> str:
    from hydra_edge.train.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer([SAMPLE_TEXT], vocab_size=512).to_str()


# a byte-level BPE tokenizer that fits hydra-tiny's vocabulary of 512
TOKENIZER_JSON = _bpe_tokenizer_json()


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
    float_result = export_model(model, TOKENIZER_JSON, root / "tiny-f32", ExportOptions(quantize="none"), task="text")
    int8_result = export_model(model, TOKENIZER_JSON, root / "tiny-int8", ExportOptions(quantize="int8"), task="text")
    return {"model": model, "none": float_result, "int8": int8_result}
