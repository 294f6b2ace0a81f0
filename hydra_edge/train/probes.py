"""Probe tasks for the ablations: each one needs a particular component of Hydra.

All three use the character tokenizer of the logic task (letters ``A``..``Z``,
``->``, ``.``) and put the loss on answer letters only. A sequence of
``seq_len + 1`` tokens is filled with items and padded with ``<pad>``.

- ``recall`` (for SGA): key/value pairs ``K->V.`` with distinct keys, then
  every key asked again in shuffled order (``K->`` is answered with ``V``).
  The pairs and queries of one item span about ``window`` tokens, so exact
  recall works from SGA's window while the SSM must compress the pairs.
- ``domains`` (for MoE): every sequence follows one of 32 fixed letter maps,
  ``X->f(X).`` with each letter asked once per round of 26 pairs, so the
  answers come from the weights, not from copying. Which map is in force is
  only seen from the pairs, so per-chunk routing can give maps their own experts.
- ``facts`` (for PKM): a fixed table of three-letter keys and one-letter
  values, ``XYZ->V.``; the held-out evaluation asks the same facts in another
  order, because the probe measures what the weights memorised.

The maps and facts come from ``WORLD_SEED``, never from the training seed,
so every rank and the evaluation see the same world.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from torch import nn

from ..errors import UsageError
from .logic import EVAL_SEED_OFFSET, IGNORE_INDEX
from .tokenizer import ARROW, EOS, LETTERS, PAD, PERIOD, build_logic_tokenizer, check_vocab_fits

WORLD_SEED = 20_261_204
PROBE_TASKS = ("recall", "domains", "facts")

# ``recall``: an item has window // RECALL_TOKENS_PER_PAIR_AND_QUERY pairs, clipped to these bounds
RECALL_TOKENS_PER_PAIR_AND_QUERY = 8
RECALL_MIN_PAIRS, RECALL_MAX_PAIRS = 2, 12
DOMAINS = 32
FACTS = 8192
FACT_KEY_LETTERS = 3

# one item: its token ids and, per id, whether that id is an answer (a label)
Item = tuple[list[int], list[bool]]


class ProbeTask:
    """Batches of packed probe items and the held-out accuracy on their answers."""

    def __init__(self, name: str, vocab_size: int, seq_len: int, *, seed: int, window: int) -> None:
        if name not in PROBE_TASKS:
            raise UsageError(f"unknown probe task {name!r}; choose one of: {', '.join(PROBE_TASKS)}")
        self.name = name
        self.tokenizer = build_logic_tokenizer()
        check_vocab_fits(self.tokenizer, vocab_size)
        self.vocab = self.tokenizer.get_vocab()
        self.letters = [self.vocab[c] for c in LETTERS]
        self.seq_len = seq_len
        self.seed = seed
        self.rng = random.Random(seed)

        world = random.Random(WORLD_SEED)
        self.n_pairs = min(RECALL_MAX_PAIRS, max(RECALL_MIN_PAIRS, window // RECALL_TOKENS_PER_PAIR_AND_QUERY))
        self.maps = [world.sample(self.letters, len(self.letters)) for _ in range(DOMAINS)]
        keys = world.sample(range(len(LETTERS) ** FACT_KEY_LETTERS), FACTS)
        self.facts = [(self._key_letters(k), world.choice(self.letters)) for k in keys]

        make: dict[str, Callable[[random.Random], Item]] = {
            "recall": self._recall_item, "domains": self._domains_item, "facts": self._facts_item}
        self.make_item = make[name]
        shortest = len(self.make_item(random.Random(0))[0])
        if name != "domains" and seq_len + 1 < shortest:
            raise UsageError(f"--seq-len {seq_len} is too short for the {name} task: one item takes {shortest} "
                             f"tokens; use --seq-len {shortest - 1} or more")
        self.recent_accuracy = 0.0

    def _key_letters(self, key: int) -> list[int]:
        digits = []
        for _ in range(FACT_KEY_LETTERS):
            key, digit = divmod(key, len(LETTERS))
            digits.append(self.letters[digit])
        return digits

    def _pair(self, x: list[int], y: int, answer: bool) -> Item:
        """Token ids of ``x->y.``; ``y`` is a label when ``answer``."""
        ids = x + [self.vocab[ARROW], y, self.vocab[PERIOD]]
        is_label = [False] * len(ids)
        is_label[len(x) + 1] = answer
        return ids, is_label

    # -- items ------------------------------------------------------------------

    def _recall_item(self, rng: random.Random) -> Item:
        keys = rng.sample(self.letters, self.n_pairs)
        values = {k: rng.choice(self.letters) for k in keys}
        parts = [self._pair([k], values[k], False) for k in keys]
        parts += [self._pair([k], values[k], True) for k in rng.sample(keys, len(keys))]
        parts.append(([self.vocab[EOS]], [False]))
        return _join(parts)

    def _domains_item(self, rng: random.Random) -> Item:
        # One map for the whole sequence: the item fills it. Each round asks
        # every letter once, so no pair can be copied from earlier in the
        # sequence until a round of 26 pairs has passed.
        mapping = self.maps[rng.randrange(DOMAINS)]
        parts = []
        while 4 * len(parts) < self.seq_len + 1:
            for x in rng.sample(range(len(self.letters)), len(self.letters)):
                parts.append(self._pair([self.letters[x]], mapping[x], True))
        return _join(parts)

    def _facts_item(self, rng: random.Random) -> Item:
        key, value = rng.choice(self.facts)
        return self._pair(key, value, True)

    # -- batches ----------------------------------------------------------------

    def _sequence(self, rng: random.Random) -> tuple[list[int], list[bool]]:
        ids: list[int] = []
        is_label: list[bool] = []
        while True:
            item_ids, item_labels = self.make_item(rng)
            room = self.seq_len + 1 - len(ids)
            if self.name == "domains":  # a domain item is cut to the sequence
                item_ids, item_labels = item_ids[:room], item_labels[:room]
            elif len(item_ids) > room:
                break
            ids += item_ids
            is_label += item_labels
            if len(ids) == self.seq_len + 1:
                break
        pad = self.seq_len + 1 - len(ids)
        return ids + [self.vocab[PAD]] * pad, is_label + [False] * pad

    def _batch(self, rng: random.Random, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self._sequence(rng) for _ in range(batch_size)]
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long)  # (B, T+1)
        is_label = torch.tensor([r[1] for r in rows], dtype=torch.bool)
        # the label at position t is the token at t+1, kept only where that token is an answer
        labels = torch.where(is_label[:, 1:], ids[:, 1:], IGNORE_INDEX)
        return ids[:, :-1], labels

    def sample_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return training inputs and labels, both (B, seq_len)."""
        return self._batch(self.rng, batch_size)

    def record_step(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, str]:
        """Return the progress-bar field: the running accuracy on the answers of training batches."""
        answered = labels != IGNORE_INDEX
        if answered.any():
            correct = (logits.detach().argmax(-1) == labels) & answered
            self.recent_accuracy = 0.9 * self.recent_accuracy + 0.1 * correct.sum().item() / answered.sum().item()
        return {"acc": f"{self.recent_accuracy:.2f}"}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, *, batches: int, batch_size: int) -> dict:
        """Measure the held-out accuracy on answers: the argmax over the whole vocabulary.

        Returns {"accuracy": fraction correct, "answers": number of answers scored}.
        """
        rng = random.Random(self.seed + EVAL_SEED_OFFSET)
        correct = total = 0
        was_training = model.training
        model.eval()
        for _ in range(batches):
            inputs, labels = self._batch(rng, batch_size)
            logits, _ = model(inputs)
            answered = labels != IGNORE_INDEX
            correct += ((logits.argmax(-1) == labels) & answered).sum().item()
            total += answered.sum().item()
        model.train(was_training)
        return {"accuracy": correct / max(total, 1), "answers": total}


def _join(parts: list[Item]) -> Item:
    ids: list[int] = []
    is_label: list[bool] = []
    for part_ids, part_labels in parts:
        ids += part_ids
        is_label += part_labels
    return ids, is_label
