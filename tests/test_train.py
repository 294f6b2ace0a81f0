"""Training runs on tiny presets: falling loss, checkpoint round trips, the text task and bad options."""

import math
import os
import random
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from hydra_edge.cli import main
from hydra_edge.config import get_preset
from hydra_edge.errors import HydraEdgeError, UsageError
from hydra_edge.model import build_model
from hydra_edge.train import checkpoint as checkpoint_module
from hydra_edge.train.checkpoint import load_checkpoint, save_checkpoint
from hydra_edge.train.loop import lr_at, train
from hydra_edge.train.options import TrainConfig
from hydra_edge.train.text import TextTask, read_text_file, split_held_out
from hydra_edge.train.tokenizer import ENDOFTEXT, build_logic_tokenizer, train_bpe_tokenizer

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "valid.txt"

WORDS = ("the cat sat on a mat while the dog ran to the old house near river and "
         "every child read one green book about stars planets moons ships").split()


def write_text(path: Path, lines: int = 3000, seed: int = 0) -> Path:
    """Write seeded pseudo-English text, about 30 characters per line."""
    rng = random.Random(seed)
    text = "".join(" ".join(rng.choice(WORDS) for _ in range(6)).capitalize() + ".\n" for _ in range(lines))
    path.write_text(text, encoding="utf-8")
    return path


def quick_config(tmp_path: Path, **overrides) -> TrainConfig:
    # one thread: tests often share the cores with other jobs, where more threads wait on each other
    options = dict(steps=30, batch_size=8, seq_len=64, warmup=5, eval_batches=2, progress=False, threads=1,
                   out=str(tmp_path / "model.pt"))
    options.update(overrides)
    return TrainConfig(**options)


@pytest.fixture(scope="module")
def logic_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("logic")
    return train(get_preset("hydra-tiny"), quick_config(tmp_path))


def test_logic_loss_falls(logic_run):
    losses = logic_run.losses
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # from uniform over 512 tokens (ln 512 = 6.24) towards uniform over the 26 letters (ln 26 = 3.26)
    assert first > 5.5
    assert last < first - 1.0
    assert logic_run.final_loss == pytest.approx(sum(losses[-3:]) / 3)


def test_logic_eval_reports_every_hop_count(logic_run):
    accuracy = logic_run.eval["accuracy_by_hops"]
    assert sorted(accuracy) == list(range(1, 9))
    assert all(0.0 <= a <= 1.0 for a in accuracy.values())
    assert all(n > 0 for n in logic_run.eval["problems_by_hops"].values())


def test_checkpoint_round_trip_gives_identical_logits(logic_run):
    model, cfg, tokenizer, meta = load_checkpoint(logic_run.checkpoint)
    assert cfg == get_preset("hydra-tiny")
    assert not model.training
    assert meta["task"] == "logic"
    assert meta["train"]["steps"] == 30
    assert meta["train"]["eval"]["accuracy_by_hops"] == logic_run.eval["accuracy_by_hops"]
    assert tokenizer.to_str() == build_logic_tokenizer().to_str()

    idx = torch.tensor([tokenizer.encode("C->D.A->B.D->E.B->C.A->").ids])
    with torch.no_grad():
        expected, _ = logic_run.model(idx)
        actual, _ = model(idx)
    assert torch.equal(actual, expected)


def test_checkpoint_loads_with_weights_only(logic_run):
    data = torch.load(logic_run.checkpoint, weights_only=True, map_location="cpu")
    assert data["format"] == "hydra-edge-checkpoint"
    assert data["version"] == 1
    assert data["config"]["name"] == "hydra-tiny"
    assert isinstance(data["tokenizer"], str)


def test_transformer_trains_on_logic(tmp_path):
    result = train(get_preset("transformer-tiny"), quick_config(tmp_path, steps=10))
    model, cfg, _, _ = load_checkpoint(result.checkpoint)
    assert cfg.kind == "transformer"
    assert result.losses[-1] < result.losses[0]


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) == pytest.approx(0.55e-3)
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    decay = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_lr_warmup_longer_than_run():
    cfg = TrainConfig(steps=4, warmup=50, lr=1e-3)
    assert [lr_at(s, cfg) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])


def test_cli_train_prints_accuracy_table(tmp_path):
    out = tmp_path / "cli.pt"
    result = CliRunner().invoke(main, [
        "train", "--preset", "hydra-tiny", "--task", "logic", "--steps", "3", "--batch-size", "4",
        "--seq-len", "64", "--eval-batches", "1", "--threads", "1", "--no-progress", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "held-out accuracy by hop count (training curriculum at level 1 of 8):"
    assert lines[1].split() == ["hops", "problems", "accuracy"]
    assert [line.split()[0] for line in lines[2:11]] == [str(k) for k in range(1, 9)] + ["all"]
    assert lines[-1].startswith(f"saved {out}: 3 steps")
    assert out.is_file()


# -- the text task -----------------------------------------------------------


def test_text_task_trains_and_reports_perplexity(tmp_path):
    data = write_text(tmp_path / "corpus.txt")
    result = train(get_preset("hydra-tiny"), quick_config(tmp_path, task="text", data=str(data), steps=10,
                                                          seq_len=32))
    assert result.losses[-1] < result.losses[0]
    loss, perplexity = result.eval["loss"], result.eval["perplexity"]
    assert perplexity == pytest.approx(math.exp(loss))
    # better than uniform over the 512-token vocabulary
    assert perplexity < 512
    assert result.eval["tokens"] == 2 * 8 * 32

    model, cfg, tokenizer, meta = load_checkpoint(result.checkpoint)
    assert meta["task"] == "text"
    assert tokenizer.token_to_id(ENDOFTEXT) == 0
    assert tokenizer.get_vocab_size() <= cfg.vocab_size


def test_cli_train_text_prints_perplexity(tmp_path):
    data = write_text(tmp_path / "corpus.txt")
    result = CliRunner().invoke(main, [
        "train", "--task", "text", "--data", str(data), "--steps", "2", "--batch-size", "2",
        "--seq-len", "32", "--eval-batches", "1", "--threads", "1", "--no-progress", "--out", str(tmp_path / "text.pt"),
    ])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("held-out loss ")
    assert "perplexity" in result.stdout


@pytest.mark.skipif(not WIKITEXT.is_file(), reason=f"WikiText-2 validation text not found at {WIKITEXT}")
def test_text_task_on_wikitext(tmp_path):
    result = train(get_preset("hydra-tiny"), quick_config(tmp_path, task="text", data=str(WIKITEXT), steps=5,
                                                          seq_len=64))
    assert 1.0 < result.eval["perplexity"] < 1000.0
    assert result.eval["tokens"] == 2 * 8 * 64


def test_bpe_tokenizer_round_trips_unicode():
    text = "Zürich — 東京 café\n  indented line\n"
    tokenizer = train_bpe_tokenizer([text] * 20, 300)
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    assert tokenizer.get_vocab_size() <= 300


def test_bpe_tokenizer_rejects_tiny_vocab():
    with pytest.raises(UsageError, match="vocab_size 100 is too small for a byte-level BPE tokenizer"):
        train_bpe_tokenizer(["abc"], 100)


def test_text_encoding_decodes_to_original(tmp_path):
    data = write_text(tmp_path / "corpus.txt")
    task = TextTask(data, 512, 32, seed=0)
    train_text, held_out_text = split_held_out(data.read_text(encoding="utf-8"))
    assert task.tokenizer.decode(task.train_ids.tolist()) == train_text
    assert task.tokenizer.decode(task.eval_ids.tolist()) == held_out_text


def test_held_out_split_at_line_break():
    text = "".join(f"line {i:03d}\n" for i in range(100))  # 9 characters per line
    train_text, held_out = split_held_out(text)
    assert train_text + held_out == text
    assert held_out == "".join(f"line {i:03d}\n" for i in range(90, 100))


def test_text_file_too_short_for_seq_len(tmp_path):
    data = tmp_path / "short.txt"
    data.write_text("just a few words\n" * 3, encoding="utf-8")
    with pytest.raises(UsageError, match=r"tokens, fewer than --seq-len \+ 1 = 129; use a longer file"):
        TextTask(data, 512, 128, seed=0)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"", "is empty; pass a file with text in it"),
        ("blank.txt", b"  \n\n", "is empty; pass a file with text in it"),
        ("latin1.txt", "café au lait\n".encode("latin-1"), "is not UTF-8 text (invalid byte at offset 3)"),
        ("nul.bin", b"abc\x00def\n", "is binary (it contains NUL bytes)"),
        ("random.bin", bytes(range(256)) * 4, "is binary"),
    ],
    ids=["empty", "whitespace", "latin-1", "nul-bytes", "random-bytes"],
)
def test_bad_text_file_raises(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UsageError, match=re.escape(message)):
        read_text_file(path)


def test_missing_and_directory_text_file_raise(tmp_path):
    with pytest.raises(UsageError, match="not found; pass an existing text file with --data"):
        read_text_file(tmp_path / "absent.txt")
    with pytest.raises(UsageError, match="is not a file; pass a text file with --data"):
        read_text_file(tmp_path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "text"], "error: the text task needs a text file: pass --data PATH"),
        (["--task", "text", "--data", "absent.txt"], "error: data file absent.txt not found"),
        (["--task", "logic", "--data", "x.txt"], "error: --data is only read by --task text"),
        (["--preset", "hydra-huge"], "error: unknown preset 'hydra-huge'; choose one of: hydra-29m"),
        (["--steps", "0"], "error: --steps must be at least 1, got 0"),
        (["--seq-len", "20"], "error: --seq-len 20 is too short for the logic task"),
        (["--seq-len", "100000"], "error: --seq-len 100,000 is more than 16,384; train on shorter sequences"),
        (["--batch-size", "1000", "--seq-len", "1000"],
         "error: --batch-size x --seq-len = 1,000,000 tokens per step is more than 65,536; lower one of them"),
        (["--lr", "0"], "error: --lr must be a positive number, got 0.0"),
        (["--out", "no/such/folder/model.pt"], "error: output folder no/such/folder does not exist"),
    ],
    ids=["text-without-data", "missing-data", "logic-with-data", "unknown-preset", "zero-steps",
         "short-seq-len", "huge-seq-len", "huge-step", "zero-lr", "missing-out-folder"],
)
def test_cli_train_bad_option_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["train", "--no-progress", *args])
    assert result.exit_code == 2
    assert result.stderr.startswith(message)
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_cli_caps_threads_at_the_cores(tmp_path, caplog):
    out = tmp_path / "m.pt"
    result = CliRunner().invoke(main, ["train", "--steps", "1", "--batch-size", "2", "--threads", "100000",
                                       "--eval-batches", "1", "--no-progress", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file()
    cores = os.cpu_count()
    assert f"--threads 100000 is more than the {cores} CPU cores; using {cores}" in caplog.text


def test_cli_binary_data_one_line(tmp_path):
    data = tmp_path / "weights.bin"
    data.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    result = CliRunner().invoke(main, ["train", "--task", "text", "--data", str(data), "--out",
                                       str(tmp_path / "m.pt")])
    assert result.exit_code == 2
    assert result.stderr == f"error: data file {data} is binary (it contains NUL bytes); pass a UTF-8 text file\n"


def test_cli_verbose_shows_traceback(tmp_path):
    result = CliRunner().invoke(main, ["--verbose", "train", "--steps", "0"])
    assert result.exit_code == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.rstrip().endswith("error: --steps must be at least 1, got 0")


# -- atomic saving ------------------------------------------------------------


def test_failed_save_keeps_existing_file(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    path.write_bytes(b"earlier checkpoint")
    model = build_model(get_preset("hydra-tiny"))

    def broken_save(obj, f):
        f.write(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, model, get_preset("hydra-tiny"), build_logic_tokenizer(), task="logic", train={})
    assert path.read_bytes() == b"earlier checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_save_replaces_existing_file(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"earlier checkpoint")
    cfg = get_preset("hydra-tiny")
    save_checkpoint(path, build_model(cfg), cfg, build_logic_tokenizer(), task="logic", train={"steps": 0})
    _, loaded_cfg, _, meta = load_checkpoint(path)
    assert loaded_cfg == cfg
    assert meta == {"task": "logic", "train": {"steps": 0}}
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_nan_loss_raises_hydra_edge_error(tmp_path):
    with pytest.raises(HydraEdgeError, match=r"training loss became nan at step [1-4]; lower --lr and retry"):
        train(get_preset("hydra-tiny"), quick_config(tmp_path, steps=5, warmup=0, lr=1e30))
    assert not (tmp_path / "model.pt").exists()
