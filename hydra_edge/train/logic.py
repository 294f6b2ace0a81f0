"""The logic task: synthetic multi-step implication chains.

A problem lists premises ``X->Y.`` over single uppercase letters: one chain of
k hops from a start letter (k = 1..max_hops) and distractor chains over other
letters, all shuffled. A query ``S->`` names the chain's start, and the answer
is the letter at the chain's end, followed by ``.``::

    C->D.A->B.D->E.B->C.A->C.      (2 hops: A->B->C)

The prompt that a runtime completes is the problem up to and including the
query's ``->``; greedy decoding of one token gives the answer.

Training packs several problems per sequence, each followed by ``<eos>``, and
pads the rest with ``<pad>``. A sequence starts directly with a problem (no
``<bos>``), as a prompt does. The loss covers only the answer letters, because
every other letter is random.

Hop counts of training problems follow a curriculum (see HopCurriculum):
1 hop at first, then uniformly 1..level, where the level rises each time the
running training accuracy on problems of ``level`` hops reaches a threshold.
A tiny model first learns to look up one premise, and only then to chain
lookups. Without the curriculum, hop counts are uniform over 1..max_hops.
The held-out evaluation draws problems from a separate seed and cycles
through all hop counts, so each count gets the same number of problems. It
poses each problem alone, from a fresh state, as a runtime prompt is posed:
in a packed sequence the answer would also depend on the problems before it,
and those differ between training (short chains early in the curriculum) and
evaluation (all hop counts).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UsageError
from .tokenizer import ARROW, EOS, LETTERS, PAD, PERIOD, build_logic_tokenizer, check_vocab_fits

IGNORE_INDEX = -100  # label of positions without loss (the default of F.cross_entropy)
# added to the training seed for the held-out problems; no rank offset comes near it
EVAL_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class Problem:
    """One problem: its shuffled premises, the query's start letter and the answer."""

    premises: tuple[tuple[str, str], ...]
    start: str
    answer: str
    hops: int

    @property
    def prompt(self) -> str:
        """The premises and the query, e.g. ``A->B.B->C.A->``."""
        return "".join(f"{x}{ARROW}{y}{PERIOD}" for x, y in self.premises) + f"{self.start}{ARROW}"

    @property
    def text(self) -> str:
        """The prompt followed by the answer and ``.``."""
        return f"{self.prompt}{self.answer}{PERIOD}"


def max_distractors(max_hops: int) -> int:
    """Return the most distractor premises that fit the 26 letters next to a chain of ``max_hops``.

    In the worst case every distractor premise is its own chain of two fresh letters.
    """
    return (len(LETTERS) - (max_hops + 1)) // 2


def make_problem(rng: random.Random, hops: int, n_distractors: int) -> Problem:
    """Draw a problem whose chain has ``hops`` premises, plus ``n_distractors`` distractor premises.

    Distractor chains use letters disjoint from the main chain and from each
    other, so the answer is the only letter reached from the start.
    """
    letters = rng.sample(LETTERS, len(LETTERS))
    chain, rest = letters[: hops + 1], letters[hops + 1:]
    premises = [(chain[i], chain[i + 1]) for i in range(hops)]

    # distractor chains of random length until n_distractors premises exist
    remaining = n_distractors
    while remaining > 0:
        length = rng.randint(1, remaining)
        if len(rest) < length + 1:
            raise UsageError(f"{n_distractors} distractor premises do not fit next to a {hops}-hop chain")
        links, rest = rest[: length + 1], rest[length + 1:]
        premises += [(links[i], links[i + 1]) for i in range(length)]
        remaining -= length

    rng.shuffle(premises)
    return Problem(premises=tuple(premises), start=chain[0], answer=chain[-1], hops=hops)


def problem_length(hops: int, n_distractors: int) -> int:
    """Return the tokens of a packed problem: 4 per premise, query (2), answer and ``.`` (2), ``<eos>``."""
    return 4 * (hops + n_distractors) + 5


class HopCurriculum:
    """Hop counts that rise with the model's training accuracy.

    Problems have 1..level hops, drawn uniformly. The level starts at 1 (or
    at max_hops when disabled) and rises by one whenever the exponential
    moving average of the per-batch accuracy on problems of exactly ``level``
    hops reaches ``threshold``.
    """

    def __init__(self, max_hops: int, *, enabled: bool, threshold: float, smoothing: float = 0.9) -> None:
        self.max_hops = max_hops
        self.level = 1 if enabled else max_hops
        self.threshold = threshold
        self.smoothing = smoothing
        self.accuracy = 0.0  # running average on problems of ``level`` hops

    def draw(self, rng: random.Random) -> int:
        return rng.randint(1, self.level)

    def update(self, batch_accuracy: float) -> None:
        self.accuracy = self.smoothing * self.accuracy + (1 - self.smoothing) * batch_accuracy
        if self.level < self.max_hops and self.accuracy >= self.threshold:
            self.level += 1
            # the new level's problems start unsolved: the average restarts at 0
            self.accuracy = 0.0


class LogicTask:
    """Batches of packed logic problems and the held-out accuracy by hop count."""

    def __init__(
        self, vocab_size: int, seq_len: int, *, max_hops: int, n_distractors: int, seed: int,
        curriculum: bool = True, curriculum_threshold: float = 0.5,
    ) -> None:
        if not 1 <= max_hops <= 8:
            raise UsageError(f"max_hops must be between 1 and 8, got {max_hops}")
        if not 0 <= n_distractors <= max_distractors(max_hops):
            raise UsageError(
                f"n_distractors must be between 0 and {max_distractors(max_hops)} "
                f"for chains of up to {max_hops} hops, got {n_distractors}"
            )
        longest = problem_length(max_hops, n_distractors)
        if seq_len + 1 < longest:
            raise UsageError(
                f"--seq-len {seq_len} is too short for the logic task: a {max_hops}-hop problem "
                f"with {n_distractors} distractors takes {longest} tokens and a sequence holds --seq-len + 1 tokens; "
                f"use --seq-len {longest - 1} or more"
            )
        self.tokenizer = build_logic_tokenizer()
        check_vocab_fits(self.tokenizer, vocab_size)
        self.vocab = self.tokenizer.get_vocab()
        self.seq_len = seq_len
        self.max_hops = max_hops
        self.n_distractors = n_distractors
        self.seed = seed
        self.rng = random.Random(seed)
        self.curriculum = HopCurriculum(max_hops, enabled=curriculum, threshold=curriculum_threshold)
        self.train_problems = self._training_problems()
        self.train_pending: list[Problem] = []
        self.train_hops = torch.zeros(0, dtype=torch.long)  # hop count per label of the last batch

    def problem_ids(self, problem: Problem) -> list[int]:
        """Token ids of ``problem.text`` followed by ``<eos>``, without calling the tokenizer."""
        v = self.vocab
        ids: list[int] = []
        for x, y in problem.premises:
            ids += [v[x], v[ARROW], v[y], v[PERIOD]]
        return ids + [v[problem.start], v[ARROW], v[problem.answer], v[PERIOD], v[EOS]]

    def _pack(self, problems: Iterator[Problem], pending: list[Problem]) -> tuple[list[int], list[int]]:
        """Fill seq_len + 1 tokens with problems and return the ids and, per position, the hop count
        of the answer there (0 where no answer is).

        A problem that does not fit stays in ``pending`` and starts the next
        sequence, so long problems are not dropped more often than short ones.
        """
        ids: list[int] = []
        hops_at: list[int] = []
        while True:
            problem = pending.pop() if pending else next(problems)
            problem_ids = self.problem_ids(problem)
            if len(ids) + len(problem_ids) > self.seq_len + 1:
                pending.append(problem)
                break
            answer_pos = len(ids) + len(problem_ids) - 3  # before "." and "<eos>"
            ids += problem_ids
            hops_at += [0] * len(problem_ids)
            hops_at[answer_pos] = problem.hops
        pad = self.seq_len + 1 - len(ids)
        return ids + [self.vocab[PAD]] * pad, hops_at + [0] * pad

    def _batch(
        self, problems: Iterator[Problem], pending: list[Problem], batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return inputs, labels and the hop count of each label (0 where none), all (B, seq_len)."""
        rows = [self._pack(problems, pending) for _ in range(batch_size)]
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long)  # (B, T+1)
        hops = torch.tensor([r[1] for r in rows], dtype=torch.long)
        inputs = ids[:, :-1]
        # the label at position t is the token at t+1, kept only where that token is an answer
        labels = torch.where(hops[:, 1:] > 0, ids[:, 1:], IGNORE_INDEX)
        return inputs, labels, hops[:, 1:]

    def _training_problems(self) -> Iterator[Problem]:
        while True:
            yield make_problem(self.rng, self.curriculum.draw(self.rng), self.n_distractors)

    def _held_out_problems(self, rng: random.Random) -> Iterator[Problem]:
        for i in itertools.count():
            yield make_problem(rng, 1 + i % self.max_hops, self.n_distractors)

    def sample_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return training inputs and labels (B, seq_len), with hop counts from the curriculum."""
        inputs, labels, self.train_hops = self._batch(self.train_problems, self.train_pending, batch_size)
        return inputs, labels

    def record_step(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, str]:
        """Feed the accuracy of the last training batch to the curriculum and return progress-bar fields.

        ``logits`` (B, T, V) and ``labels`` (B, T) belong to the last ``sample_batch`` call.
        """
        newest = self.train_hops == self.curriculum.level  # (B, T), answers of the newest hop count only
        if newest.any():
            correct = (logits.detach().argmax(-1) == labels) & newest
            self.curriculum.update(correct.sum().item() / newest.sum().item())
        return {"hops": f"1-{self.curriculum.level}"}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, *, batches: int, batch_size: int) -> dict:
        """Measure held-out accuracy by hop count: the argmax over the whole vocabulary at each answer.

        Each row contains one problem from position 0, padded after its end. A
        batch has as many rows as fit into the tokens of ``batch_size`` training
        sequences, so evaluation reads about as many tokens as training does per step.

        Returns {"accuracy_by_hops": {k: accuracy}, "problems_by_hops": {k: count},
        "accuracy": overall accuracy, "curriculum_level": the most hops trained on}.
        """
        problems = self._held_out_problems(random.Random(self.seed + EVAL_SEED_OFFSET))
        longest = problem_length(self.max_hops, self.n_distractors)
        rows = batch_size * max(1, (self.seq_len + 1) // longest)
        correct = torch.zeros(self.max_hops + 1, dtype=torch.long)
        total = torch.zeros(self.max_hops + 1, dtype=torch.long)
        was_training = model.training
        model.eval()
        for _ in range(batches):
            batch = [next(problems) for _ in range(rows)]
            ids = [self.problem_ids(p) for p in batch]
            inputs = torch.tensor([x + [self.vocab[PAD]] * (longest - len(x)) for x in ids])  # (rows, longest)
            # The query's arrow is the 4th token from the end: the answer, "." and "<eos>" follow it.
            arrow = torch.tensor([len(x) - 4 for x in ids])
            answers = torch.tensor([self.vocab[p.answer] for p in batch])
            hops = torch.tensor([p.hops for p in batch])
            logits, _ = model(inputs)
            predicted = logits[torch.arange(rows), arrow].argmax(-1)  # (rows,)
            correct += torch.bincount(hops[predicted == answers], minlength=self.max_hops + 1)
            total += torch.bincount(hops, minlength=self.max_hops + 1)
        model.train(was_training)
        ks = range(1, self.max_hops + 1)
        return {
            "accuracy_by_hops": {k: correct[k].item() / max(total[k].item(), 1) for k in ks},
            "problems_by_hops": {k: total[k].item() for k in ks},
            "accuracy": correct.sum().item() / max(total.sum().item(), 1),
            "curriculum_level": self.curriculum.level,
        }
