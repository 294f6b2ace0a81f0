"""Tokenizers of the two training tasks, built with the ``tokenizers`` library.

Both serialise to a tokenizer.json string, which the checkpoint stores and an
exported bundle copies, so the runtime needs nothing from this package to
encode a prompt.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE, WordLevel
from tokenizers.trainers import BpeTrainer

from ..errors import UsageError

log = logging.getLogger(__name__)

# logic task vocabulary: special tokens first, so their ids are stable
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
LOGIC_SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
LETTERS = list(string.ascii_uppercase)
ARROW, PERIOD = "->", "."

# text task: the one special token, GPT-2's document separator
ENDOFTEXT = "<|endoftext|>"


def build_logic_tokenizer() -> Tokenizer:
    """Build the character-level tokenizer of the logic task (32 tokens).

    Ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, ``A``..``Z`` 4..29,
    ``->`` 30, ``.`` 31. Any other character (lowercase, space, a lone ``-``)
    becomes ``<unk>``. Decoding concatenates tokens without spaces, so
    ``decode(encode(text).ids) == text`` for every problem text.
    """
    tokens = LOGIC_SPECIAL_TOKENS + LETTERS + [ARROW, PERIOD]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token=UNK))
    # "->" is one token; every other character is its own token
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"->|."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(LOGIC_SPECIAL_TOKENS)
    return tokenizer


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer with at most ``vocab_size`` tokens.

    The vocabulary contains the 256 byte symbols, ``<|endoftext|>`` and the merges
    learned from ``texts``. A small text may yield fewer than ``vocab_size``
    tokens, because training stops when no pair is left to merge.
    """
    min_size = 256 + 1
    if vocab_size < min_size:
        raise UsageError(
            f"vocab_size {vocab_size} is too small for a byte-level BPE tokenizer; "
            f"use a preset with vocab_size >= {min_size}"
        )
    tokenizer = Tokenizer(BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    log.info("trained a byte-level BPE tokenizer with %d tokens", tokenizer.get_vocab_size())
    return tokenizer


def check_vocab_fits(tokenizer: Tokenizer, vocab_size: int) -> None:
    """Raise UsageError unless every token id of ``tokenizer`` is below ``vocab_size``."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise UsageError(
            f"the tokenizer has {size} tokens but the model's vocab_size is {vocab_size}; "
            "choose a preset with a larger vocabulary"
        )
