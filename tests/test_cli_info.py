"""``hydra-edge info``: parameter counts per component, the total and the state size."""

import re

import pytest
import torch
from click.testing import CliRunner

from hydra_edge.cli import format_table, main
from hydra_edge.config import get_preset, hydra_state_spec, state_bytes
from hydra_edge.model import build_model, count_parameters
from hydra_edge.train.checkpoint import save_checkpoint
from hydra_edge.train.tokenizer import build_logic_tokenizer

HYDRA_COMPONENTS = ["embedding", "controllers + norms", "ssm", "sga", "moe", "workspace", "pkm"]


def write_checkpoint(path, preset):
    torch.manual_seed(0)
    cfg = get_preset(preset)
    model = build_model(cfg)
    save_checkpoint(path, model, cfg, build_logic_tokenizer(), task="logic", train={"steps": 0})
    return count_parameters(model)


def run_info(path):
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 0, result.output
    return result.stdout


def table_rows(output):
    """Return {component: (modules, parameters)} from the table, and the total."""
    rows, total = {}, None
    for line in output.splitlines():
        match = re.fullmatch(r"(\S.*?)\s+(\d+)?\s+([\d,]+)\s+([\d.]+)%", line)
        if not match:
            continue
        name, modules, parameters = match.group(1), match.group(2), int(match.group(3).replace(",", ""))
        if name == "total":
            total = parameters
        else:
            rows[name] = (int(modules), parameters)
    return rows, total


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("info")
    counts = {}
    for preset in ("hydra-tiny", "transformer-tiny", "hydra-29m", "transformer-29m"):
        counts[preset] = write_checkpoint(folder / f"{preset}.pt", preset)
    return folder, counts


def test_info_hydra_tiny_components(checkpoints):
    folder, counts = checkpoints
    output = run_info(folder / "hydra-tiny.pt")
    rows, total = table_rows(output)

    assert total == counts["hydra-tiny"]
    assert 250_000 < total < 350_000
    assert sorted(rows) == sorted(HYDRA_COMPONENTS)
    assert sum(parameters for _, parameters in rows.values()) == total
    # hydra-tiny: 4 blocks, SGA in blocks 1 and 3, MoE in blocks 1 and 3
    assert rows["ssm"][0] == 4
    assert rows["sga"][0] == 2
    assert rows["moe"][0] == 2
    assert rows["embedding"] == (1, 512 * 64)
    assert output.splitlines()[0].startswith("checkpoint ")
    assert "hydra-tiny (hydra), vocab_size 512, d_model 64, n_layer 4" in output


def test_info_hydra_state_bytes(checkpoints):
    folder, _ = checkpoints
    output = run_info(folder / "hydra-tiny.pt")
    expected = state_bytes(hydra_state_spec(get_preset("hydra-tiny"), batch=1))
    assert f"state per sequence (fixed): {expected:,} bytes" in output


def test_info_transformer_kv_cache_bytes(checkpoints):
    folder, counts = checkpoints
    output = run_info(folder / "transformer-tiny.pt")
    rows, total = table_rows(output)
    assert total == counts["transformer-tiny"]
    assert sorted(rows) == ["attention", "embedding", "mlp", "norms"]
    # 4 blocks x (key + value) x 64 floats x 4 bytes
    assert f"KV cache per token (grows with context): {4 * 2 * 64 * 4:,} bytes" in output


def test_info_hydra_29m_total(checkpoints):
    folder, counts = checkpoints
    _, total = table_rows(run_info(folder / "hydra-29m.pt"))
    assert total == counts["hydra-29m"]
    assert 28_000_000 <= total <= 30_000_000


def test_info_transformer_29m_within_five_percent(checkpoints):
    folder, _ = checkpoints
    _, hydra_total = table_rows(run_info(folder / "hydra-29m.pt"))
    _, transformer_total = table_rows(run_info(folder / "transformer-29m.pt"))
    assert abs(transformer_total - hydra_total) / hydra_total <= 0.05


def test_format_table_aligns_columns():
    text = format_table(["name", "count"], [("a", 1), ("longer", 1234)])
    assert text.splitlines() == [
        "name    count",
        "a           1",
        "longer   1234",
    ]
