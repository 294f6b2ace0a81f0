"""The logic task: problem generation, its tokenizer and the packed training batches."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hydra_edge.config import PRESETS
from hydra_edge.errors import UsageError
from hydra_edge.train.logic import (
    IGNORE_INDEX,
    HopCurriculum,
    LogicTask,
    make_problem,
    max_distractors,
    problem_length,
)
from hydra_edge.train.tokenizer import build_logic_tokenizer


def follow(premises, start, hops):
    """Walk ``hops`` implications from ``start``; None if a step has no premise."""
    successor = dict(premises)
    letter = start
    for _ in range(hops):
        if letter not in successor:
            return None
        letter = successor[letter]
    return letter


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32), hops=st.integers(1, 8), n_distractors=st.integers(0, 8))
def test_problem_answer_is_chain_end(seed, hops, n_distractors):
    problem = make_problem(random.Random(seed), hops, n_distractors)
    successor = dict(problem.premises)

    assert problem.hops == hops
    assert len(problem.premises) == hops + n_distractors
    # every letter implies at most one letter and is implied by at most one
    assert len(successor) == len(problem.premises)
    assert len(set(successor.values())) == len(problem.premises)
    assert follow(problem.premises, problem.start, hops) == problem.answer
    # the chain ends at the answer, so k hops is the only reading
    assert problem.answer not in successor
    # the start is not the end of any premise, so the chain does not begin earlier
    assert problem.start not in successor.values()


def test_problem_text_format():
    problem = make_problem(random.Random(3), 2, 2)
    text = problem.text
    assert text.startswith(problem.prompt)
    assert problem.prompt.endswith(f".{problem.start}->")
    assert text.endswith(f"{problem.start}->{problem.answer}.")
    assert text.count(".") == len(problem.premises) + 1


def test_distractors_use_other_letters():
    for seed in range(50):
        problem = make_problem(random.Random(seed), 3, 6)
        successor = dict(problem.premises)
        reached = {problem.start}
        letter = problem.start
        while letter in successor:
            letter = successor[letter]
            reached.add(letter)
        # only the chain's 4 letters are reachable from the start
        assert len(reached) == 4


def test_tokenizer_example_ids():
    tokenizer = build_logic_tokenizer()
    encoding = tokenizer.encode("C->D.A->B.D->E.B->C.A->")
    assert encoding.tokens == ["C", "->", "D", ".", "A", "->", "B", ".", "D", "->", "E", ".",
                               "B", "->", "C", ".", "A", "->"]
    assert encoding.ids[:4] == [6, 30, 7, 31]
    assert tokenizer.token_to_id("<pad>") == 0
    assert tokenizer.token_to_id("<eos>") == 2


@pytest.mark.parametrize("seed", range(20))
def test_tokenizer_round_trips_problems(seed):
    tokenizer = build_logic_tokenizer()
    problem = make_problem(random.Random(seed), 1 + seed % 8, 4)
    ids = tokenizer.encode(problem.text).ids
    assert tokenizer.decode(ids) == problem.text
    assert "<unk>" not in tokenizer.encode(problem.text).tokens


def test_tokenizer_maps_unknown_characters_to_unk():
    tokenizer = build_logic_tokenizer()
    assert tokenizer.encode("a-b").tokens == ["<unk>", "<unk>", "<unk>"]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_tokenizer_ids_below_vocab_size(preset):
    tokenizer = build_logic_tokenizer()
    assert max(tokenizer.get_vocab().values()) < PRESETS[preset].vocab_size


def test_problem_ids_match_tokenizer():
    task = LogicTask(512, 128, max_hops=8, n_distractors=4, seed=0)
    for seed in range(20):
        problem = make_problem(random.Random(seed), 1 + seed % 8, 4)
        expected = task.tokenizer.encode(problem.text).ids + [task.tokenizer.token_to_id("<eos>")]
        assert task.problem_ids(problem) == expected
        assert len(expected) == problem_length(problem.hops, 4)


def test_batch_labels_only_at_answers():
    task = LogicTask(512, 128, max_hops=8, n_distractors=4, seed=1)
    inputs, labels = task.sample_batch(16)
    arrow = task.tokenizer.token_to_id("->")
    letters = {task.tokenizer.token_to_id(chr(c)) for c in range(ord("A"), ord("Z") + 1)}

    assert inputs.shape == (16, 128)
    assert labels.shape == (16, 128)
    assert int(inputs.max()) < 512
    answer_positions = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
    # at least one problem per sequence
    assert len(set(answer_positions[0].tolist())) == 16
    # each label sits on the query's "->" and names a letter
    assert set(inputs[answer_positions].tolist()) == {arrow}
    assert set(labels[answer_positions].tolist()) <= letters
    # a sequence starts with a premise, as a prompt does (no <bos>)
    assert set(inputs[:, 0].tolist()) <= letters


def chain_end(premises, start):
    successor = dict(premises)
    letter = start
    while letter in successor:
        letter = successor[letter]
    return letter


def test_batch_answers_are_chain_ends():
    task = LogicTask(512, 128, max_hops=8, n_distractors=4, seed=2)
    inputs, labels = task.sample_batch(8)
    tokenizer = task.tokenizer
    checked = 0
    for row_inputs, row_labels in zip(inputs.tolist(), labels.tolist()):
        text = tokenizer.decode(row_inputs, skip_special_tokens=False)
        labelled = [tokenizer.id_to_token(t) for t in row_labels if t != IGNORE_INDEX]
        # complete problems end with "." before their <eos>
        problems = [p for p in text.split("<eos>") if p.endswith(".")]
        assert len(problems) == len(labelled)
        for problem_text, label in zip(problems, labelled):
            *premise_texts, query = problem_text.rstrip(".").split(".")
            premises = [tuple(p.split("->")) for p in premise_texts]
            start, answer = query.split("->")
            assert answer == label
            assert chain_end(premises, start) == answer
            checked += 1
    assert checked >= 16


class ZeroLogits(nn.Module):
    """A stand-in model whose argmax is always token 0 (<pad>), so no prediction is correct."""

    def forward(self, inputs):
        return torch.zeros(*inputs.shape, 512), torch.zeros(())


def test_held_out_hops_are_balanced():
    task = LogicTask(512, 128, max_hops=8, n_distractors=4, seed=0)
    result = task.evaluate(ZeroLogits(), batches=4, batch_size=16)
    counts = list(result["problems_by_hops"].values())
    assert sum(counts) > 100
    assert max(counts) - min(counts) <= 1
    assert result["accuracy"] == 0.0


class ChainOracle(nn.Module):
    """A stand-in model that solves every problem posed alone from position 0.

    It reads the premises of each row up to the query, follows the chain and
    puts its one high logit on the chain's end at the query's arrow only. An
    evaluation that reads any other position scores below 1, and so does one
    whose rows contain more than one problem.
    """

    def __init__(self, task: LogicTask) -> None:
        super().__init__()
        self.task = task

    def forward(self, inputs):
        logits = torch.zeros(*inputs.shape, 512)
        inverse = {i: t for t, i in self.task.vocab.items()}
        for row, ids in enumerate(inputs.tolist()):
            tokens = [inverse[i] for i in ids]
            premises = []
            pos = 0
            # Premises are "X -> Y ." and the query "S -> answer ." is the one followed by "<eos>".
            while tokens[pos + 3] == ".":
                if tokens[pos + 4] == "<eos>":
                    break
                premises.append((tokens[pos], tokens[pos + 2]))
                pos += 4
            logits[row, pos + 1, self.task.vocab[chain_end(premises, tokens[pos])]] = 1.0
        return logits, torch.zeros(())


def test_evaluation_poses_each_problem_alone():
    task = LogicTask(512, 128, max_hops=8, n_distractors=4, seed=0)
    result = task.evaluate(ChainOracle(task), batches=2, batch_size=8)
    assert result["accuracy"] == 1.0
    # 8 training rows of 129 tokens make room for 16 rows of the longest problem (53 tokens)
    assert result["problems_by_hops"] == {k: 4 for k in range(1, 9)}


def test_held_out_set_is_fixed():
    a = LogicTask(512, 128, max_hops=8, n_distractors=4, seed=0)
    b = LogicTask(512, 128, max_hops=8, n_distractors=4, seed=0)
    a.sample_batch(4)  # training draws must not move the held-out problems
    problems_a = a._held_out_problems(random.Random(5))
    problems_b = b._held_out_problems(random.Random(5))
    assert [next(problems_a).text for _ in range(5)] == [next(problems_b).text for _ in range(5)]


def test_seq_len_too_short_raises():
    with pytest.raises(UsageError, match=r"--seq-len 40 is too short .* takes 53 tokens and a sequence holds --seq-len \+ 1 tokens; use --seq-len 52"):
        LogicTask(512, 40, max_hops=8, n_distractors=4, seed=0)


def test_vocab_too_small_raises():
    with pytest.raises(UsageError, match="the tokenizer has 32 tokens but the model's vocab_size is 16"):
        LogicTask(16, 128, max_hops=8, n_distractors=4, seed=0)


def test_too_many_distractors_raises():
    limit = max_distractors(8)
    with pytest.raises(UsageError, match=f"n_distractors must be between 0 and {limit}"):
        LogicTask(512, 512, max_hops=8, n_distractors=limit + 1, seed=0)


def test_curriculum_starts_with_one_hop():
    curriculum = HopCurriculum(8, enabled=True, threshold=0.6)
    rng = random.Random(0)
    assert curriculum.level == 1
    assert {curriculum.draw(rng) for _ in range(50)} == {1}


def test_curriculum_rises_at_threshold():
    curriculum = HopCurriculum(3, enabled=True, threshold=0.6, smoothing=0.9)
    # the running average after n perfect batches is 1 - 0.9**n, which first reaches 0.6 at n = 9
    for _ in range(8):
        curriculum.update(1.0)
    assert curriculum.level == 1
    curriculum.update(1.0)
    assert curriculum.level == 2
    assert curriculum.accuracy == 0.0
    for _ in range(9):
        curriculum.update(1.0)
    assert curriculum.level == 3
    for _ in range(20):
        curriculum.update(1.0)
    assert curriculum.level == 3


def test_curriculum_ignores_low_accuracy():
    curriculum = HopCurriculum(8, enabled=True, threshold=0.6)
    for _ in range(100):
        curriculum.update(0.5)
    assert curriculum.level == 1


def test_curriculum_disabled_draws_all_hops():
    curriculum = HopCurriculum(8, enabled=False, threshold=0.6)
    rng = random.Random(0)
    assert curriculum.level == 8
    assert {curriculum.draw(rng) for _ in range(500)} == set(range(1, 9))


def test_record_step_feeds_answer_accuracy():
    task = LogicTask(512, 128, max_hops=8, n_distractors=4, seed=0)
    inputs, labels = task.sample_batch(4)
    perfect = torch.nn.functional.one_hot(labels.clamp(min=0), 512).float()
    fields = task.record_step(perfect, labels)
    assert fields == {"hops": "1-1"}
    assert task.curriculum.accuracy == pytest.approx(0.1)
