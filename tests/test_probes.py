"""The ablation probes (recall, domains, facts) and models with a component switched off."""

import dataclasses
import random

import pytest
import torch
from click.testing import CliRunner

from hydra_edge.cli import main
from hydra_edge.config import config_from_dict, config_to_dict, get_preset
from hydra_edge.errors import UsageError
from hydra_edge.train.logic import IGNORE_INDEX
from hydra_edge.train.probes import DOMAINS, FACTS, ProbeTask


def decode(task, ids):
    return "".join(task.tokenizer.id_to_token(i) for i in ids)


def test_recall_item_asks_every_key_again():
    task = ProbeTask("recall", 512, 128, seed=0, window=32)
    ids, is_label = task.make_item(random.Random(1))
    text = decode(task, ids)
    assert task.n_pairs == 4
    assert len(ids) == 4 * 4 * 2 + 1
    assert text.endswith("<eos>")
    pairs = [text[i:i + 5] for i in range(0, 5 * 8, 5)]  # "K->V." is 4 tokens and 5 characters
    stored = {p[0]: p[3] for p in pairs[:4]}
    assert len(stored) == 4  # distinct keys
    assert sorted(pairs[4:]) == sorted(pairs[:4])  # every pair asked once, in another order
    # only the values of the queries are answers
    assert [i for i, flag in enumerate(is_label) if flag] == [18, 22, 26, 30]


def test_domains_sequence_follows_one_map():
    task = ProbeTask("domains", 512, 128, seed=0, window=32)
    inputs, labels = task.sample_batch(4)
    assert inputs.shape == (4, 128)
    for row in range(4):
        text = decode(task, inputs[row].tolist())
        pairs = [text[i:i + 5] for i in range(0, 5 * 32, 5)]
        mapping = {p[0]: p[3] for p in pairs}
        assert all(mapping[p[0]] == p[3] for p in pairs)  # one map for the whole sequence
        assert len({p[0] for p in pairs[:26]}) == 26  # every letter once per round
        maps = [dict(zip((task.tokenizer.id_to_token(i) for i in task.letters),
                         (task.tokenizer.id_to_token(i) for i in m))) for m in task.maps]
        assert sum(all(m[x] == y for x, y in mapping.items()) for m in maps) >= 1
        answered = (labels[row] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert answered == list(range(1, 128, 4))  # the label of "->" is the mapped letter
    assert len(task.maps) == DOMAINS


def test_facts_are_the_same_world_for_every_seed():
    first = ProbeTask("facts", 512, 128, seed=0, window=32)
    other = ProbeTask("facts", 512, 128, seed=7, window=32)
    assert first.facts == other.facts
    assert len({tuple(key) for key, _ in first.facts}) == FACTS
    inputs, labels = first.sample_batch(2)
    text = decode(first, inputs[0].tolist())
    key, value = text[:3], text[5]
    table = {decode(first, k): first.tokenizer.id_to_token(v) for k, v in first.facts}
    assert table[key] == value
    assert labels[0, 3].item() == first.vocab[value]  # predicted at "->"
    assert (labels[0] != IGNORE_INDEX).sum().item() == 128 // 6


def test_probe_evaluation_counts_every_answer():
    task = ProbeTask("recall", 512, 128, seed=0, window=32)

    class Oracle(torch.nn.Module):
        def forward(self, inputs):
            # predicts the next token by peeking at the data: every answer right
            logits = torch.full((*inputs.shape, 512), -1.0)
            nxt = torch.roll(inputs, -1, dims=1)
            logits.scatter_(2, nxt.unsqueeze(-1), 1.0)
            return logits, None

    result = task.evaluate(Oracle(), batches=2, batch_size=4)
    assert result["answers"] == 2 * 4 * 12
    assert result["accuracy"] > 0.9  # the last position of a row has no peek


def test_probe_rejects_short_sequences():
    with pytest.raises(UsageError, match="--seq-len 16 is too short for the recall task: one item takes 33 tokens"):
        ProbeTask("recall", 512, 16, seed=0, window=32)


def test_cli_trains_an_ablated_probe_model(tmp_path):
    out = tmp_path / "facts.pt"
    result = CliRunner().invoke(main, ["train", "--task", "facts", "--ablate", "pkm", "--steps", "3", "--threads",
                                       "1", "--batch-size", "4", "--no-progress", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "held-out accuracy" in result.output
    from hydra_edge.train.checkpoint import load_checkpoint

    model, cfg, _, meta = load_checkpoint(out)
    assert cfg.ablate == ("pkm",)
    assert meta["task"] == "facts"

    exported = CliRunner().invoke(main, ["export", str(out), "--out", str(tmp_path / "b")])
    assert exported.exit_code == 2
    assert "the model has pkm switched off for an ablation study; only complete models can be exported" \
        in exported.output
    assert not (tmp_path / "b").exists()


def test_cli_ablate_needs_a_hydra_preset(tmp_path):
    result = CliRunner().invoke(main, ["train", "--preset", "transformer-tiny", "--ablate", "sga", "--steps", "1",
                                       "--out", str(tmp_path / "t.pt")])
    assert result.exit_code == 2
    assert "error: --ablate switches off Hydra components; transformer-tiny is a transformer" in result.output


def test_ablate_survives_the_config_round_trip():
    cfg = dataclasses.replace(get_preset("hydra-tiny"), ablate=("pkm", "sga"))
    data = config_to_dict(cfg)
    data["ablate"] = list(data["ablate"])  # as JSON stores it
    assert config_from_dict(data) == cfg
    data["ablate"] = "pkm"
    with pytest.raises(UsageError, match="field ablate must be a list of component names, got 'pkm'"):
        config_from_dict(data)
